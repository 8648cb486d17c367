// The CareFlow Web phone script shared by the Node.js and the browser tests. It reports each
// step as one event line; the Rust test waits for them in order:
//   registered 1 -> answers one incoming call (incoming 1, incoming-confirmed 1,
//   incoming-ended 1) -> calls `target` (outgoing-confirmed, outgoing-ended) -> its socket is
//   cut (dropped) -> JsSIP reconnects and registers again (registered 2) -> answers a second
//   call (incoming-confirmed 2, incoming-ended 2) -> done.
'use strict';

// JsSIP: the library; opts: {url, uri, password, target}; event(...parts): reports a step;
// microphone(): a MediaStream; dropSocket(ws): cuts the WebSocket under JsSIP.
function run(JsSIP, opts, event, microphone, dropSocket) {
  const socket = new JsSIP.WebSocketInterface(opts.url);
  const ua = new JsSIP.UA({
    sockets: [socket],
    uri: opts.uri,
    password: opts.password,
    register: true,
    register_expires: 300,
    session_timers: false,
    user_agent: 'JsSIP (careflow-sip interop)',
    connection_recovery_min_interval: 1,
    connection_recovery_max_interval: 2,
  });
  const pcConfig = { iceServers: [] };
  let registrations = 0;
  let incomingCalls = 0;

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
      if (n === 2) {
        event('done');
        ua.stop();
      }
    });
    Promise.resolve(microphone()).then((mediaStream) => session.answer({ mediaStream, pcConfig }));
  });

  function callOut() {
    Promise.resolve(microphone()).then((mediaStream) => {
      const session = ua.call(opts.target, { mediaStream, pcConfig });
      session.on('confirmed', () => {
        event('outgoing-confirmed');
        setTimeout(() => session.terminate(), 500);
      });
      session.on('failed', (e) => event('outgoing-failed', e.cause));
      session.on('ended', () => {
        event('outgoing-ended');
        event('dropped');
        dropSocket(socket._ws);
      });
    });
  }

  ua.start();
  return ua;
}

module.exports = { run };
