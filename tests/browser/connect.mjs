// A real browser connects a merchant: opens the connect link, signs in on the
// mock provider's page, approves, and must land on return_to with
// status=connected. Driven by tests/it/connect.rs (a_real_browser_connects_a_merchant).
//
// usage: node connect.mjs LINK RETURN_TO_PREFIX USER PASSWORD
// CHROMIUM overrides the browser executable (default /usr/bin/chromium).
import { chromium } from 'playwright-core';

const [link, returnTo, user, password] = process.argv.slice(2);
if (!link || !returnTo || !user || !password) {
  console.error('usage: node connect.mjs LINK RETURN_TO_PREFIX USER PASSWORD');
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-background-networking'],
  headless: true,
});
let failed = null;
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  await page.goto(link);
  // The connect listener sent us on to the provider's sign-in page.
  await page.fill('input[name=username]', user);
  await page.fill('input[name=password]', password);
  await Promise.all([
    page.waitForURL((url) => url.href.startsWith(returnTo)),
    page.click('button[value=approve]'),
  ]);
  const landed = new URL(page.url());
  const status = landed.searchParams.get('status');
  const subject = landed.searchParams.get('subject');
  console.log(`landed on ${landed.origin}${landed.pathname} subject=${subject} status=${status}`);
  if (status !== 'connected') failed = `status is ${status}, not connected`;
  const cookies = await context.cookies();
  const bound = cookies.find((c) => c.name === 'tokenproxy_connect');
  if (!bound) failed = failed || 'the connect listener set no tokenproxy_connect cookie';
  else if (!bound.httpOnly || bound.sameSite !== 'Lax') {
    failed = failed || `the connect cookie is not HttpOnly and SameSite=Lax: ${JSON.stringify(bound)}`;
  }
} catch (e) {
  failed = String(e && e.stack ? e.stack : e);
} finally {
  await browser.close();
}
if (failed) {
  console.error(`FAILED: ${failed}`);
  process.exit(1);
}
console.log('connected in a real browser');
