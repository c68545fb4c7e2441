// Launches Debian's Chromium (headless) through playwright-core, both from the environment
// scripts/lib/browser.sh sets: INVENTORYSYNC_TEST_CHROMIUM (the browser) and
// INVENTORYSYNC_TEST_PLAYWRIGHT (the playwright-core package directory).
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);

/** The browser, headless. */
export async function launch() {
  const { chromium } = require(process.env.INVENTORYSYNC_TEST_PLAYWRIGHT);
  return chromium.launch({
    executablePath: process.env.INVENTORYSYNC_TEST_CHROMIUM,
    headless: true,
    args: ["--no-sandbox"],
  });
}
