// What a browser gives JsSIP, for the Node.js phones: WebSocket (trusting the test's
// self-signed certificates) and, with `webrtc`, the WebRTC classes of @roamhq/wrtc and a
// silent microphone.
'use strict';

const WebSocket = require('ws');

function installBrowser({ webrtc }) {
  global.WebSocket = class extends WebSocket {
    constructor(address, protocols) {
      super(address, protocols, { rejectUnauthorized: false });
    }
  };
  global.window = global;
  if (!webrtc) return null;
  const wrtc = require('@roamhq/wrtc');
  global.RTCPeerConnection = wrtc.RTCPeerConnection;
  global.RTCSessionDescription = wrtc.RTCSessionDescription;
  global.RTCIceCandidate = wrtc.RTCIceCandidate;
  global.MediaStream = wrtc.MediaStream;
  return function microphone() {
    const source = new wrtc.nonstandard.RTCAudioSource();
    return new wrtc.MediaStream([source.createTrack()]);
  };
}

module.exports = { installBrowser };
