// The same phone script as jssip-phone.js, in a real browser: Debian's Chromium driven by
// playwright-core, JsSIP bundled by esbuild, a fake microphone, WebRTC from the browser itself.
//
// Usage: node browser-phone.js WS_URL SIP_URI PASSWORD CALL_TARGET SCREENSHOT_DIR [SCRIPT]
// SCRIPT is `phone` (phone.js, the default) or `media` (media.js: talks through rtpengine).
'use strict';

const path = require('path');
const fs = require('fs');
const os = require('os');
const http = require('http');
const esbuild = require('esbuild');
const { chromium } = require('playwright-core');

const [url, uri, password, target, shots, script = 'phone'] = process.argv.slice(2);
if (!target) {
  console.error('usage: node browser-phone.js WS_URL SIP_URI PASSWORD CALL_TARGET [SCREENSHOT_DIR]');
  process.exit(2);
}

function event(...parts) {
  process.stdout.write(parts.join(' ') + '\n');
}

async function main() {
  const bundle = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'careflow-js-')), 'phone.js');
  esbuild.buildSync({
    entryPoints: [path.join(__dirname, 'browser-entry.js')],
    bundle: true,
    format: 'iife',
    outfile: bundle,
    logLevel: 'error',
  });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--use-fake-device-for-media-stream',
      '--use-fake-ui-for-media-stream',
      // The test server's certificate is self-signed.
      '--ignore-certificate-errors',
      '--no-sandbox',
      // Media goes to rtpengine on 127.0.0.1: ICE may use loopback, and host candidates are
      // plain addresses rather than mDNS names.
      '--allow-loopback-in-peer-connection',
      '--disable-features=WebRtcHideLocalIpsWithMdns',
    ],
  });
  const page = await browser.newPage();
  page.on('pageerror', (e) => event('page-error', JSON.stringify(String(e))));
  let finished;
  const done = new Promise((resolve) => { finished = resolve; });
  await page.exposeFunction('reportEvent', async (line) => {
    if (line === 'done') {
      // The test stops us once it reads "done": take the picture first.
      if (shots) await page.screenshot({ path: path.join(shots, `browser-${script}.png`) });
      finished();
    }
    event(line);
  });
  // getUserMedia needs a secure context: the page comes from http://localhost.
  const html = '<!doctype html><title>CareFlow Web phone (test)</title>' +
    '<h1>CareFlow Web phone</h1><pre id="log"></pre><script src="/phone.js"></script>';
  const web = http.createServer((req, res) => {
    if (req.url === '/phone.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      res.end(fs.readFileSync(bundle));
    } else {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(html);
    }
  });
  await new Promise((resolve) => web.listen(0, '127.0.0.1', resolve));
  await page.goto(`http://localhost:${web.address().port}/`);
  await page.evaluate((o) => {
    const log = document.getElementById('log');
    const report = (...parts) => {
      const line = parts.join(' ');
      log.textContent += line + '\n';
      window.reportEvent(line);
    };
    if (o.script === 'media') {
      window.runMedia(window.JsSIP, o, report, () => navigator.mediaDevices.getUserMedia({ audio: true }));
      return;
    }
    window.runPhone(
      window.JsSIP,
      o,
      report,
      () => navigator.mediaDevices.getUserMedia({ audio: true }),
      // A browser cannot cut a socket without a close handshake; closing it from under JsSIP
      // is what a network change looks like to the page.
      (ws) => ws.close(),
    );
  }, { url, uri, password, target, script });
  await done;
  await browser.close();
  process.exit(0);
}

setTimeout(() => {
  event('timeout');
  process.exit(1);
}, 90000);

main().catch((e) => {
  event('error', JSON.stringify(String(e && e.stack || e)));
  process.exit(1);
});
