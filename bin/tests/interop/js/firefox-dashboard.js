// The dashboard in Firefox (Debian's firefox-esr, headless) through geckodriver, spoken to with
// plain W3C WebDriver requests: a clinician signs in by the CareFlow hand-over link, generates
// credentials, sees a device appear without a reload, opens a set-up guide; axe-core checks
// the views. One event line per step; waits for "registered" on stdin before watching the
// device list.
//
// Usage: node firefox-dashboard.js BASE_URL USER_TOKEN SCREENSHOT_DIR GECKODRIVER PORT
//   credentials USER PASSWORD -> no-devices-shown -> (stdin: registered) -> device-online TEXT -> guide OK
//   -> axe-total N -> done
'use strict';

const fs = require('fs');
const path = require('path');
const readline = require('readline');
const { spawn } = require('child_process');

const [base, token, shots, geckodriver, port] = process.argv.slice(2);
if (!port) {
  console.error('usage: node firefox-dashboard.js BASE_URL USER_TOKEN SCREENSHOT_DIR GECKODRIVER PORT');
  process.exit(2);
}
const ELEMENT = 'element-6066-11e4-a52e-4f735466cecf';

function event(...parts) {
  process.stdout.write(parts.join(' ') + '\n');
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const input = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => input.once('line', resolve));

const driver = spawn(geckodriver, ['--port', port, '--host', '127.0.0.1'], { stdio: ['ignore', 'ignore', 'inherit'] });
let session = null;

async function wd(method, url, body) {
  const res = await fetch(`http://127.0.0.1:${port}${url}`, {
    method,
    headers: { 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json();
  if (!res.ok) throw new Error(`${method} ${url}: ${JSON.stringify(data.value)}`);
  return data.value;
}
const s = (method, url, body) => wd(method, `/session/${session}${url}`, body);

async function find(css, timeout = 15000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    try {
      const e = await s('POST', '/element', { using: 'css selector', value: css });
      if (await s('GET', `/element/${e[ELEMENT]}/displayed`)) return e[ELEMENT];
    } catch (_) { /* not there yet */ }
    if (Date.now() > deadline) throw new Error(`no visible ${css}`);
    await sleep(200);
  }
}
const click = async (css) => s('POST', `/element/${await find(css)}/click`, {});
const text = async (css) => s('GET', `/element/${await find(css)}/text`);
const exec = (script, args = []) => s('POST', '/execute/sync', { script, args });
async function shot(name) {
  const png = await s('GET', '/screenshot');
  fs.writeFileSync(path.join(shots, `firefox-${name}.png`), Buffer.from(png, 'base64'));
}

const axeSource = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
let axeTotal = 0;
async function axe(view) {
  await exec(`${axeSource}; return true;`);
  const found = await s('POST', '/execute/async', {
    script: `const done = arguments[arguments.length - 1];
      window.axe.run(document, { runOnly: ['wcag2a', 'wcag2aa', 'wcag21aa'] })
        .then((r) => done(r.violations.map((v) => v.id + ':' + v.nodes.length)));`,
    args: [],
  });
  axeTotal += found.length;
  event('axe', view, ...found);
}

async function main() {
  for (let i = 0; ; i++) {
    try {
      if ((await wd('GET', '/status')).ready) break;
    } catch (_) { /* starting */ }
    if (i > 100) throw new Error('geckodriver did not start');
    await sleep(100);
  }
  const created = await wd('POST', '/session', {
    capabilities: {
      alwaysMatch: {
        browserName: 'firefox',
        'moz:firefoxOptions': {
          binary: process.env.FIREFOX || '/usr/bin/firefox-esr',
          args: ['-headless', '-width=1200', '-height=900'],
        },
      },
    },
  });
  session = created.sessionId;
  event('browser', created.capabilities.browserName, created.capabilities.browserVersion);

  await s('POST', '/url', { url: `${base}/#token=${token}` });
  await click('#generate');
  const password = (await text('#new-password')).trim();
  const user = (await text('#sip-username')).trim();
  await shot('password-once');
  await axe('account');
  event('credentials', user, password);

  await click('a[data-view="devices"]');
  await find('#no-devices');
  // The test registers the devices only now: registered before the view showed, they would
  // hide "no device" before it could be seen.
  event('no-devices-shown');
  await nextLine();
  await find('#devices tr');
  // Every device the user registered (the test registers them all before "registered").
  const rows = await find('#devices');
  const rowText = await s('GET', `/element/${rows}/text`);
  await shot('devices');
  await axe('devices');
  event('device-online', JSON.stringify(rowText.replace(/\s+/g, ' ').trim()));

  await click('a[data-view="setup"]');
  await exec("const s = document.querySelector('#device-kind'); s.value = 'yealink'; s.dispatchEvent(new Event('change')); return true;");
  const guide = await text('#guide');
  await shot('setup');
  await axe('setup');
  event('guide', guide.includes(user) && guide.includes(password) ? 'values-filled' : 'values-missing');
  event('axe-total', axeTotal);
  await s('DELETE', '');
  event('done');
}

const timer = setTimeout(() => {
  event('timeout');
  driver.kill();
  process.exit(1);
}, 120000);

main().then(() => {
  clearTimeout(timer);
  driver.kill();
  process.exit(0);
}).catch((e) => {
  event('error', JSON.stringify(String(e && e.stack || e)));
  driver.kill();
  process.exit(1);
});
