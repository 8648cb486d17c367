// Drives careflow-sip's dashboard in Debian's Chromium (playwright-core) the way a clinician and
// an IT administrator use it. One event line per step on stdout; where the Rust test must act
// (register a SIP client, check the server), the script waits for a line on stdin.
//
// Usage: node dashboard.js BASE_URL USER_TOKEN EXPIRED_TOKEN API_KEY SCREENSHOT_DIR
//   expired-refused -> account-empty -> (stdin: created) -> conflict-shown
//   -> credentials USER PASSWORD -> servers T=ADDR... -> (stdin: registered)
//   -> requests-while-waiting none|PATHS -> device-online TEXT -> (stdin: called) -> recent-call TEXT
//   -> device-removed -> (stdin: next) -> guide USER_SEEN -> baresip-line LINE -> qr PNG URL
//   -> rotated PASSWORD -> (stdin: next) -> revoked -> regenerated USER -> ready-for-outage -> (stdin: stopped) -> unreachable-shown
//   -> (stdin: started) -> recovered -> (stdin: next) -> admin-audit TEXT -> calls-export NAME LINES
//   -> device-added PASSWORD
//   -> admin USERS FAILURES -> local-storage -> axe-total N
//   -> done
// Every view is also checked with axe-core (WCAG 2 A/AA rules: labels, contrast, roles):
// "axe VIEW RULE:NODES..." lists what it found, "axe-total N" sums them.
'use strict';

const fs = require('fs');
const path = require('path');
const readline = require('readline');
const { chromium } = require('playwright-core');

const [base, token, expired, apiKey, shots] = process.argv.slice(2);
if (!shots) {
  console.error('usage: node dashboard.js BASE_URL USER_TOKEN EXPIRED_TOKEN API_KEY SCREENSHOT_DIR');
  process.exit(2);
}

function event(...parts) {
  process.stdout.write(parts.join(' ') + '\n');
}

const input = readline.createInterface({ input: process.stdin });
const lines = [];
let waiting = null;
input.on('line', (l) => {
  if (waiting) {
    const w = waiting;
    waiting = null;
    w(l);
  } else {
    lines.push(l);
  }
});
function nextLine() {
  if (lines.length) return Promise.resolve(lines.shift());
  return new Promise((resolve) => { waiting = resolve; });
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox'],
  });
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: base });
  const page = await context.newPage();
  page.on('pageerror', (e) => event('page-error', JSON.stringify(String(e))));
  const shot = (name) => page.screenshot({ path: path.join(shots, `dashboard-${name}.png`), fullPage: true });
  const axeSource = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
  let axeTotal = 0;
  // page.evaluate is not subject to the page's Content-Security-Policy, which stays on.
  const axe = async (view) => {
    await page.evaluate(axeSource);
    const found = await page.evaluate(async () => {
      const r = await window.axe.run(document, { runOnly: ['wcag2a', 'wcag2aa', 'wcag21aa'] });
      return r.violations.map((v) => `${v.id}:${v.nodes.length}`);
    });
    axeTotal += found.length;
    event('axe', view, ...found);
  };

  // An expired sign-in is refused with a clear message.
  await page.goto(`${base}/#token=${expired}`);
  await page.locator('#banner', { hasText: 'Your sign-in has expired' }).waitFor();
  await shot('expired');
  await axe('sign-in');
  event('expired-refused');

  // With the keyboard only: the token field has the focus; type (paste) a fresh token, Tab to
  // "Sign in", Enter. The page then focuses the view's heading; Tab reaches "Generate".
  const focused = () => page.evaluate(() => document.activeElement && (document.activeElement.id || document.activeElement.tagName));
  if (await focused() !== 'token') throw new Error(`focus on ${await focused()}, not the token field`);
  await page.keyboard.insertText(token);
  await page.keyboard.press('Tab');
  await page.keyboard.press('Enter');
  await page.locator('#account-none button#generate').waitFor();
  await shot('account-empty');
  // Meanwhile CareFlow creates the credentials through the API: the page's Generate then meets
  // a 409, says so, and shows the account; rotating gives this page a password to show.
  event('account-empty');
  await nextLine();
  await page.keyboard.press('Tab');
  if (await focused() !== 'generate') throw new Error(`Tab from the heading went to ${await focused()}`);
  await page.keyboard.press('Enter');
  await page.locator('#banner', { hasText: 'You already have SIP credentials' }).waitFor();
  await page.locator('#account-details').waitFor();
  await shot('conflict');
  event('conflict-shown');
  await page.click('#rotate');
  await page.click('#confirm-ok');
  await page.locator('#new-password').waitFor();
  const password = (await page.textContent('#new-password')).trim();
  const user = (await page.textContent('#sip-username')).trim();
  // The copy button puts the password on the clipboard.
  await page.click('#password-once button.copy');
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  if (copied !== password) throw new Error(`clipboard has ${copied}`);
  await shot('password-once');
  await axe('account');
  event('credentials', user, password);
  const servers = await page.$$eval('#servers tr', (rows) => rows.map((r) => {
    const cells = r.querySelectorAll('td');
    return `${cells[0].textContent.trim()}=${cells[1].querySelector('code').textContent.trim()}`;
  }));
  event('servers', ...servers);

  // The device list updates by itself once a phone registers: through the event stream, with
  // no request of the page's own while it waits (no polling).
  await page.click('a[data-view="devices"]');
  await page.locator('#no-devices').waitFor();
  await page.locator('#devices-updated', { hasText: 'live' }).waitFor({ timeout: 15000 });
  const asked = [];
  const onRequest = (r) => { if (r.url().includes('/api/')) asked.push(new URL(r.url()).pathname); };
  page.on('request', onRequest);
  await nextLine();
  const row = page.locator('#devices tr').first();
  await row.waitFor({ timeout: 15000 });
  page.off('request', onRequest);
  event('requests-while-waiting', asked.length ? asked.join(',') : 'none');
  await shot('devices');
  await axe('devices');
  // The same list on a phone-sized screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await shot('devices-phone');
  await axe('devices-phone');
  await page.setViewportSize({ width: 1200, height: 900 });
  event('device-online', JSON.stringify((await row.textContent()).replace(/\s+/g, ' ').trim()));
  // A call the user makes appears under Recent calls once it ends (a `call` event).
  await nextLine();
  const call = page.locator('#my-calls tr', { hasText: 'Failed' }).first();
  await call.waitFor({ timeout: 15000 });
  event('recent-call', JSON.stringify((await call.textContent()).replace(/\s+/g, ' ').trim()));

  // Deregister it from the page.
  await page.click('#devices button[data-device]');
  await page.locator('#devices tr').first().waitFor({ state: 'detached', timeout: 15000 });
  event('device-removed');
  await nextLine();

  // Set-up guides carry the user's own values.
  await page.click('a[data-view="setup"]');
  await page.selectOption('#device-kind', 'yealink');
  const guide = await page.textContent('#guide');
  await shot('setup-yealink');
  await axe('setup');
  event('guide', guide.includes(user) && guide.includes(password) ? 'values-filled' : 'values-missing');
  await page.selectOption('#device-kind', 'baresip');
  event('baresip-line', (await page.textContent('#guide-file')).trim());
  await shot('setup-baresip');
  // Linphone: a QR code with a one-time provisioning link.
  await page.selectOption('#device-kind', 'linphone');
  await page.click('#show-qr');
  await page.locator('#provision-qr').waitFor();
  const qrPng = path.join(shots, 'dashboard-qr.png');
  await page.locator('#provision-qr').screenshot({ path: qrPng });
  await shot('setup-linphone');
  event('qr', qrPng, (await page.textContent('#provision-url')).trim());

  // Rotate: confirmed in a dialog, the new password is shown once.
  await page.click('a[data-view="account"]');
  await page.click('#rotate');
  await page.click('#confirm-ok');
  await page.locator('#new-password', { hasText: /./ }).waitFor();
  await page.waitForFunction((old) => document.querySelector('#new-password').textContent.trim() !== old, password);
  const rotated = (await page.textContent('#new-password')).trim();
  await shot('account');
  event('rotated', rotated);

  // Revoke (confirmed), then start again with new credentials.
  await nextLine();
  await page.click('#revoke');
  await page.click('#confirm-ok');
  await page.locator('#account-none').waitFor();
  await shot('revoked');
  event('revoked');
  await page.click('#generate');
  await page.locator('#new-password').waitFor();
  const currentUser = (await page.textContent('#sip-username')).trim();
  event('regenerated', currentUser);

  // The server goes away and comes back: the page says so, then recovers by itself.
  await page.click('a[data-view="devices"]');
  event('ready-for-outage');
  await nextLine();
  await page.locator('#banner', { hasText: 'cannot be reached' }).waitFor({ timeout: 15000 });
  await shot('unreachable');
  event('unreachable-shown');
  await nextLine();
  await page.locator('#banner', { hasText: 'cannot be reached' }).waitFor({ state: 'hidden', timeout: 15000 });
  event('recovered');
  await nextLine();

  // IT staff: sign out, sign in with an API key.
  await page.click('#sign-out');
  await page.locator('#form-admin').waitFor({ state: 'attached' });
  await page.click('details.admin-signin summary');
  await page.fill('#apikey', apiKey);
  await page.click('#form-admin button[type="submit"]');
  await page.locator('#admin-users tr').first().waitFor();
  await page.locator('#admin-failures tr').first().waitFor();
  await page.locator('#admin-audit tr').first().waitFor();
  await page.locator('#admin-calls tr', { hasText: 'Failed' }).first().waitFor();
  event('admin-audit', JSON.stringify((await page.textContent('#admin-audit')).replace(/\s+/g, ' ').trim()));
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#export-calls-csv')]);
  const exported = fs.readFileSync(await download.path(), 'utf8');
  event('calls-export', download.suggestedFilename(), exported.split('\r\n').filter((l) => l).length);
  // A desk phone added from the page: its provisioning password is shown once.
  await page.fill('#device-mac', '00:15:65:aa:bb:cc');
  await page.selectOption('#device-model', 'yealink-t46s');
  await page.fill('#device-user', currentUser);
  await page.click('#device-add button[type="submit"]');
  await page.locator('#device-password').waitFor();
  await page.locator('#admin-phones tr', { hasText: '001565aabbcc' }).waitFor();
  event('device-added', (await page.textContent('#device-password')).trim());
  const users = await page.locator('#admin-users tr').count();
  const failures = await page.locator('#admin-failures tr code', { hasText: user }).count();
  await shot('admin');
  await axe('admin');
  event('admin', users, failures);
  // Nothing secret outlives the tab: the session is in sessionStorage only.
  const stored = await page.evaluate(() => JSON.stringify(localStorage));
  event('local-storage', stored === '{}' ? 'empty' : stored);
  event('axe-total', axeTotal);
  event('done');
  await browser.close();
  process.exit(0);
}

setTimeout(() => {
  event('timeout');
  process.exit(1);
}, 120000);

main().catch((e) => {
  event('error', JSON.stringify(String(e && e.stack || e)));
  process.exit(1);
});
