// CareFlow Web with two nodes of a cluster: JsSIP over WSS with two sockets, the first
// preferred. When its node dies, JsSIP reconnects to the other and registers again (the same
// +sip.instance and reg-id, so the binding is replaced, not doubled). Answers every call.
//
// Usage: node jssip-failover.js WSS_URL_PREFERRED WSS_URL_OTHER SIP_URI PASSWORD
// Prints "connected URL", "registered N" (every registration JsSIP reports), "incoming N",
// "incoming-confirmed N", "incoming-ended N", "disconnected". Exits when stdin closes.
'use strict';

const JsSIP = require('jssip');
const { installBrowser } = require('./node-browser');

const [preferred, other, uri, password] = process.argv.slice(2);
if (!password) {
  console.error('usage: node jssip-failover.js WSS_URL_PREFERRED WSS_URL_OTHER SIP_URI PASSWORD');
  process.exit(2);
}

const microphone = installBrowser({ webrtc: true });

function event(...parts) {
  process.stdout.write(parts.join(' ') + '\n');
}

const ua = new JsSIP.UA({
  sockets: [
    { socket: new JsSIP.WebSocketInterface(preferred), weight: 10 },
    { socket: new JsSIP.WebSocketInterface(other), weight: 1 },
  ],
  uri,
  password,
  register: true,
  register_expires: 300,
  session_timers: false,
  user_agent: 'JsSIP (careflow-sip failover)',
  connection_recovery_min_interval: 1,
  connection_recovery_max_interval: 2,
});

let registrations = 0;
let calls = 0;
ua.on('connected', (e) => event('connected', e.socket.socket.url));
ua.on('disconnected', () => event('disconnected'));
ua.on('registered', () => {
  registrations += 1;
  event('registered', registrations);
});
ua.on('registrationFailed', (e) => event('registration-failed', e.cause));
ua.on('newRTCSession', ({ session, originator }) => {
  if (originator !== 'remote') return;
  calls += 1;
  const n = calls;
  event('incoming', n);
  session.on('confirmed', () => event('incoming-confirmed', n));
  session.on('failed', (e) => event('incoming-failed', n, e.cause));
  session.on('ended', () => event('incoming-ended', n));
  session.answer({ mediaStream: microphone(), pcConfig: { iceServers: [] } });
});
ua.start();

process.stdin.on('end', () => {
  ua.stop();
  setTimeout(() => process.exit(0), 300);
});
process.stdin.resume();
setTimeout(() => {
  event('timeout');
  process.exit(1);
}, 120000);
