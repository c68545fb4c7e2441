// Drives the console in Debian's Chromium (headless) with playwright-core, as an operator
// would: a wrong key, then the right one; both warehouses streaming; a sync cycle triggered
// and seen to succeed; a conflict resolved with a note; a screenshot; the page at a phone's
// width. Called by tests/it/console.rs, which set the scene and check the state DB after.
//
//   node tests/console/drive.mjs BASE_URL KEY SCREENSHOT WAREHOUSE... 
//
// Environment: INVENTORYSYNC_TEST_CHROMIUM (the browser), INVENTORYSYNC_TEST_PLAYWRIGHT (the
// playwright-core package directory). Prints one JSON line of what it saw; exits non-zero
// with the reason on the first thing that is not as expected.
import { launch } from "./browser.mjs";

const [base, key, screenshot, ...warehouses] = process.argv.slice(2);

const seen = {};
const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console error: ${m.text()}`); });
  const started = Date.now();
  await page.goto(`${base}/console`);
  await page.locator("#key").waitFor();
  seen.loginShownMs = Date.now() - started;

  // A wrong key is refused in words, and nothing else shows.
  await page.fill("#key", "not-the-key-0123456789");
  await page.click("#login-form button[type=submit]");
  await page.locator("#login-error", { hasText: "not accepted" }).waitFor({ timeout: 10000 });
  if (await page.locator("#app").isVisible()) throw new Error("the console showed data for a wrong key");
  // (The browser reports the refused request as an error; nothing else may be one.)
  problems.length = 0;

  // The right key: every warehouse, streaming, said in words.
  await page.fill("#key", key);
  const signedIn = Date.now();
  await page.click("#login-form button[type=submit]");
  for (const w of warehouses) {
    await page.locator(`#warehouses tr[data-warehouse="${w}"] .state`, { hasText: "streaming" }).waitFor({ timeout: 30000 });
  }
  seen.warehousesShownMs = Date.now() - signedIn;
  // A slot the first warehouse's database keeps for no configured warehouse: shown with
  // the statement that drops it (read with the slot's health, every 10 s).
  await page.locator(`#warehouses tr[data-warehouse="${warehouses[0]}"] .notice`, { hasText: "pg_drop_replication_slot('inventorysync_left_behind')" }).waitFor({ timeout: 30000 });
  seen.keyInUrl = page.url().includes(key);
  seen.keyInStorage = await page.evaluate(() => sessionStorage.getItem("inventorysync.key") !== null);
  seen.cookies = (await page.context().cookies()).length;

  // A sync cycle: queued, then succeeded in the jobs table.
  await page.click("#trigger");
  const queued = page.locator("#notice", { hasText: "queued" });
  await queued.waitFor({ timeout: 10000 });
  const job = /sync-[0-9a-z-]+/.exec(await queued.textContent())[0];
  await page.locator(`#jobs tr[data-job="${job}"] .state`, { hasText: "succeeded" }).waitFor({ timeout: 60000 });
  seen.job = job;

  // A conflict: resolved with a note through the page's dialog; its row goes.
  const row = page.locator("#conflicts tr[data-conflict]").first();
  await row.waitFor({ timeout: 30000 });
  const id = await row.getAttribute("data-conflict");
  await row.getByRole("button", { name: "Resolve" }).click();
  await page.locator("#ask[open]").waitFor();
  await page.fill("#ask-note", "fixed at the warehouse: resolved from the console");
  await page.click("#ask-ok");
  await page.locator("#notice", { hasText: `Conflict ${id} is resolved` }).waitFor({ timeout: 10000 });
  await page.locator(`#conflicts tr[data-conflict="${id}"]`).waitFor({ state: "detached", timeout: 10000 });
  seen.conflict = Number(id);

  // Its dead letter: replayed from the page; it still breaks its rule, and says so.
  const dead = page.locator("#dead tr[data-dead-letter]").first();
  await dead.getByRole("button", { name: "Replay" }).click();
  await page.locator("#notice", { hasText: "invalid" }).waitFor({ timeout: 30000 });
  await page.locator("#dead tr[data-dead-letter] td", { hasText: "invalid: rule quantity_non_negative" }).first().waitFor({ timeout: 10000 });
  seen.replayed = Number(await dead.getAttribute("data-dead-letter"));

  // A forced resync asks first; cancelled, nothing is queued; confirmed, it is.
  const last = warehouses[warehouses.length - 1];
  const resync = page.locator(`#warehouses tr[data-warehouse="${last}"]`).getByRole("button", { name: "Force resync" });
  await resync.click();
  await page.locator("#ask[open]").waitFor();
  await page.getByRole("button", { name: "Cancel" }).click();
  await resync.click();
  await page.locator("#ask[open]").waitFor();
  await page.click("#ask-ok");
  const resyncQueued = page.locator("#notice", { hasText: `of ${last} queued` });
  await resyncQueued.waitFor({ timeout: 10000 });
  seen.resync = /sync-[0-9a-z-]+/.exec(await resyncQueued.textContent())[0];
  await page.locator(`#jobs tr[data-job="${seen.resync}"] .state`, { hasText: "succeeded" }).waitFor({ timeout: 60000 });

  // A verify, read-only: no question asked; its row says what it found.
  await page.locator(`#warehouses tr[data-warehouse="${last}"]`).getByRole("button", { name: "Verify", exact: true }).click();
  const verifyQueued = page.locator("#notice", { hasText: `Verify sync-` });
  await verifyQueued.waitFor({ timeout: 10000 });
  seen.verify = /sync-[0-9a-z-]+/.exec(await verifyQueued.textContent())[0];
  await page.locator(`#jobs tr[data-job="${seen.verify}"] .state`, { hasText: "succeeded" }).waitFor({ timeout: 60000 });
  seen.verifyText = await page.locator(`#jobs tr[data-job="${seen.verify}"]`).textContent();

  await page.screenshot({ path: screenshot, fullPage: true });

  // A phone's width: the page itself does not scroll sideways (the tables scroll in place).
  await page.setViewportSize({ width: 390, height: 844 });
  seen.phoneOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (problems.length) throw new Error(problems.join("; "));
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
}
