// How long the console takes to show every warehouse: from the page's request until each of
// COUNT warehouse rows is on the page (signed in with KEY), in Debian's Chromium. Used by
// scripts/bench-workers; prints one JSON line.
//
//   node tests/console/render.mjs BASE_URL KEY COUNT
import { launch } from "./browser.mjs";

const [base, key, count] = process.argv.slice(2);
const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  // Signed in already (the key in sessionStorage), as after the first visit.
  await page.goto(`${base}/console`);
  await page.evaluate((k) => sessionStorage.setItem("inventorysync.key", k), key);
  const runs = [];
  for (let i = 0; i < 3; i++) {
    const t0 = Date.now();
    await page.reload();
    await page.waitForFunction(
      (n) => document.querySelectorAll("#warehouses tr[data-warehouse]").length >= n,
      Number(count),
      { timeout: 30000, polling: 10 },
    );
    runs.push(Date.now() - t0);
  }
  console.log(JSON.stringify({ warehouses: Number(count), renderMs: runs }));
} finally {
  await browser.close();
}
