// CareFlow Web's registration habits with JsSIP over a real WebSocket: register, refresh
// (register again) REFRESHES times, unregister, register again, ROUNDS times, all on one
// connection, as a tab does over a working day. No media: only the registrar is exercised.
//
// Usage: node jssip-refresh.js WS_URL SIP_URI PASSWORD REFRESHES ROUNDS
// Prints "registered N" (N counting every 200 OK), "unregistered", "failed CAUSE", "done".
'use strict';

const JsSIP = require('jssip');
const { installBrowser } = require('./node-browser');

const [url, uri, password, refreshesArg, roundsArg] = process.argv.slice(2);
if (!roundsArg) {
  console.error('usage: node jssip-refresh.js WS_URL SIP_URI PASSWORD REFRESHES ROUNDS');
  process.exit(2);
}
const refreshes = Number(refreshesArg);
const rounds = Number(roundsArg);

installBrowser({ webrtc: false });

function event(...parts) {
  process.stdout.write(parts.join(' ') + '\n');
}

const socket = new JsSIP.WebSocketInterface(url);
const ua = new JsSIP.UA({
  sockets: [socket],
  uri,
  password,
  register: false,
  register_expires: 300,
  user_agent: 'JsSIP (careflow-sip interop)',
});

let registered = 0;
let inRound = 0;
let round = 0;
let pending = null;

function register() {
  pending = 'register';
  ua.register();
}

// JsSIP reports 'registered' only when the state changes, not for a refresh: every 200 OK to a
// REGISTER we asked for is counted from the wire instead (the socket's message handler).
const onMessage = socket._onMessage.bind(socket);
socket._onMessage = (msg) => {
  onMessage(msg);
  const text = String(msg.data);
  if (pending === 'register' && /^SIP\/2\.0 200 /.test(text) && /\r\nCSeq: *\d+ REGISTER\r\n/i.test(text)) {
    pending = null;
    registered += 1;
    inRound += 1;
    event('registered', registered);
    setImmediate(() => {
      if (inRound <= refreshes) {
        register();
      } else {
        pending = 'unregister';
        ua.unregister();
      }
    });
  }
};

ua.on('connected', () => register());
ua.on('unregistered', () => {
  event('unregistered');
  round += 1;
  inRound = 0;
  if (round < rounds) {
    register();
  } else {
    event('done');
    ua.stop();
    setTimeout(() => process.exit(0), 300);
  }
});
ua.on('registrationFailed', (e) => {
  event('failed', e.cause);
  process.exit(1);
});
ua.on('disconnected', () => event('disconnected'));
ua.start();

setTimeout(() => {
  event('timeout');
  process.exit(1);
}, 30000);
