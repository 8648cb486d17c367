// A CareFlow Web phone without the browser: JsSIP (the SIP stack CareFlow Web uses) over a
// real WebSocket, with WebRTC from @roamhq/wrtc so offers and answers are what a browser makes.
//
// Usage: node jssip-phone.js WS_URL SIP_URI PASSWORD CALL_TARGET
// The script is phone.js (events on stdout, one per line); the socket is cut without a close
// handshake. Exits 0 after "done".
'use strict';

const JsSIP = require('jssip');
const { installBrowser } = require('./node-browser');

const [url, uri, password, callTarget] = process.argv.slice(2);
if (!callTarget) {
  console.error('usage: node jssip-phone.js WS_URL SIP_URI PASSWORD CALL_TARGET');
  process.exit(2);
}

const microphone = installBrowser({ webrtc: true });

function event(...parts) {
  process.stdout.write(parts.join(' ') + '\n');
}

const { run } = require('./phone');
run(
  JsSIP,
  { url, uri, password, target: callTarget },
  (...parts) => {
    event(...parts);
    if (parts[0] === 'done') setTimeout(() => process.exit(0), 300);
  },
  microphone,
  // The network goes away under the phone (Wi-Fi roam, laptop sleep): no close handshake.
  (ws) => ws.terminate(),
);

setTimeout(() => {
  event('timeout');
  process.exit(1);
}, 90000);
