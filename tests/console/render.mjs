// How long the console takes to show every warehouse: from the page's request until each of
// COUNT warehouse rows is on the page (signed in with KEY), in Debian's Chromium. Used by
// scripts/bench-workers; prints one JSON line.
//
//   node tests/console/render.mjs BASE_URL KEY COUNT
import { createRequire } from "node:module";

const [base, key, count] = process.argv.slice(2);
const require = createRequire(import.meta.url);
const { chromium } = require(process.env.INVENTORYSYNC_TEST_PLAYWRIGHT);
const browser = await chromium.launch({
  executablePath: process.env.INVENTORYSYNC_TEST_CHROMIUM,
  headless: true,
  args: ["--no-sandbox"],
});
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
