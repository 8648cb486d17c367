// CareFlow Web talking to a desk phone: the media scenario of the rtpengine test. Each step is
// one event line for the Rust test:
//   registered -> answers one incoming call (incoming-confirmed, then after 4 s
//   incoming-stats IN OUT DTLS, hangs up 4 s later: incoming-ended) -> calls `target`
//   (outgoing-confirmed, outgoing-stats IN OUT DTLS, outgoing-ended) -> done.
// IN and OUT are the audio RTP packets the browser's peer connection received and sent; DTLS is
// the state of its DTLS transport.
'use strict';

async function mediaStats(pc) {
  let received = 0;
  let sent = 0;
  const transports = new Set();
  const states = {};
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === 'transport') states[s.id] = s.dtlsState;
    if (s.type === 'inbound-rtp' && s.kind === 'audio') {
      received += s.packetsReceived || 0;
      transports.add(s.transportId);
    }
    if (s.type === 'outbound-rtp' && s.kind === 'audio') sent += s.packetsSent || 0;
  });
  // The DTLS state of the transport the audio arrives on.
  const dtls = [...transports].map((id) => states[id] || 'none').join(',');
  return [received, sent, dtls || 'none'];
}

// JsSIP: the library; opts: {url, uri, password, target}; event(...parts): reports a step;
// microphone(): a MediaStream.
function runMedia(JsSIP, opts, event, microphone) {
  const ua = new JsSIP.UA({
    sockets: [new JsSIP.WebSocketInterface(opts.url)],
    uri: opts.uri,
    password: opts.password,
    register: true,
    register_expires: 300,
    session_timers: false,
    user_agent: 'JsSIP (careflow-sip media interop)',
  });
  const pcConfig = { iceServers: [] };

  // Talks for a while, reports what flowed, then hangs up.
  function talk(session, name) {
    session.on('confirmed', () => {
      event(`${name}-confirmed`);
      setTimeout(async () => {
        const [received, sent, dtls] = await mediaStats(session.connection);
        event(`${name}-stats`, received, sent, dtls);
        setTimeout(() => {
          if (!session.isEnded()) session.terminate();
        }, 4000);
      }, 4000);
    });
    session.on('failed', (e) => event(`${name}-failed`, e.cause));
  }

  ua.on('registered', () => event('registered'));
  ua.on('registrationFailed', (e) => event('registration-failed', e.cause));
  ua.on('newRTCSession', ({ session, originator }) => {
    if (originator !== 'remote') return;
    event('incoming', session.remote_identity.uri.toString());
    talk(session, 'incoming');
    session.on('ended', () => {
      event('incoming-ended');
      callOut();
    });
    Promise.resolve(microphone()).then((mediaStream) => session.answer({ mediaStream, pcConfig }));
  });

  function callOut() {
    Promise.resolve(microphone()).then((mediaStream) => {
      const session = ua.call(opts.target, { mediaStream, pcConfig });
      talk(session, 'outgoing');
      session.on('ended', () => {
        event('outgoing-ended');
        event('done');
        ua.stop();
      });
    });
  }

  ua.start();
  return ua;
}

module.exports = { runMedia };
