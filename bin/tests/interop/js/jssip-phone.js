// A CareFlow Web phone without the browser: JsSIP (the SIP stack CareFlow Web uses) over a
// real WebSocket, with WebRTC from @roamhq/wrtc so offers and answers are what a browser makes.
//
// Usage: node jssip-phone.js WS_URL SIP_URI PASSWORD CALL_TARGET
// Script, one line per event on stdout (the Rust test waits for them):
//   registered -> answers one incoming call (incoming, incoming-confirmed, incoming-ended)
//   -> calls CALL_TARGET (outgoing-confirmed, outgoing-ended) -> its socket is cut without a
//   close handshake (dropped) -> JsSIP reconnects and re-registers (registered 2)
//   -> answers a second incoming call (incoming-confirmed, incoming-ended) -> "done", exit 0.
'use strict';

const JsSIP = require('jssip');
const WebSocket = require('ws');
const wrtc = require('@roamhq/wrtc');

const [url, uri, password, callTarget] = process.argv.slice(2);
if (!callTarget) {
  console.error('usage: node jssip-phone.js WS_URL SIP_URI PASSWORD CALL_TARGET');
  process.exit(2);
}

// What a browser provides: WebSocket (here trusting the test's self-signed certificate) and
// the WebRTC classes.
global.WebSocket = class extends WebSocket {
  constructor(address, protocols) {
    super(address, protocols, { rejectUnauthorized: false });
  }
};
global.RTCPeerConnection = wrtc.RTCPeerConnection;
global.RTCSessionDescription = wrtc.RTCSessionDescription;
global.RTCIceCandidate = wrtc.RTCIceCandidate;
global.MediaStream = wrtc.MediaStream;
global.window = global;

function event(...parts) {
  process.stdout.write(parts.join(' ') + '\n');
}

function microphone() {
  const source = new wrtc.nonstandard.RTCAudioSource();
  return new wrtc.MediaStream([source.createTrack()]);
}

const socket = new JsSIP.WebSocketInterface(url);
const ua = new JsSIP.UA({
  sockets: [socket],
  uri,
  password,
  register: true,
  register_expires: 300,
  session_timers: false,
  user_agent: 'JsSIP (careflow-sip interop)',
  connection_recovery_min_interval: 1,
  connection_recovery_max_interval: 2,
});

let registrations = 0;
let incomingCalls = 0;
const pcConfig = { iceServers: [] };

ua.on('registered', () => {
  registrations += 1;
  event('registered', registrations);
});
ua.on('registrationFailed', (e) => event('registration-failed', e.cause));
ua.on('disconnected', () => event('disconnected'));

ua.on('newRTCSession', ({ session, originator }) => {
  if (originator !== 'remote') return;
  incomingCalls += 1;
  const n = incomingCalls;
  event('incoming', n, session.remote_identity.uri.toString());
  session.on('confirmed', () => event('incoming-confirmed', n));
  session.on('failed', (e) => event('incoming-failed', n, e.cause));
  session.on('ended', (e) => {
    event('incoming-ended', n, e.cause);
    if (n === 1) callOut();
    if (n === 2) finish();
  });
  session.answer({ mediaStream: microphone(), pcConfig });
});

function callOut() {
  const session = ua.call(callTarget, { mediaStream: microphone(), pcConfig });
  session.on('confirmed', () => {
    event('outgoing-confirmed');
    setTimeout(() => session.terminate(), 500);
  });
  session.on('failed', (e) => event('outgoing-failed', e.cause));
  session.on('ended', () => {
    event('outgoing-ended');
    dropSocket();
  });
}

// The network goes away under the phone (Wi-Fi roam, laptop sleep): no close handshake.
function dropSocket() {
  event('dropped');
  socket._ws.terminate();
}

function finish() {
  event('done');
  ua.stop();
  setTimeout(() => process.exit(0), 300);
}

setTimeout(() => {
  event('timeout');
  process.exit(1);
}, 90000);

ua.start();
