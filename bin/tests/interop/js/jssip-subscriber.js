// CareFlow Web watching a colleague with JsSIP's Subscriber over a real WebSocket: one
// subscription to their dialog state (busy lamp) and one to their presence, as the web app's
// contact list would hold. No registration: a watcher needs none.
//
// Usage: node jssip-subscriber.js WS_URL SIP_URI PASSWORD TARGET_URI
// Prints "dialog-active", "presence-active", then per NOTIFY "dialog STATES" (the <state>s of
// its dialogs, comma separated, or "idle") and "presence open|on-the-phone|closed"; on stdin
// "stop" it unsubscribes both and prints "dialog-terminated" / "presence-terminated".
'use strict';

const readline = require('readline');
const JsSIP = require('jssip');
const { installBrowser } = require('./node-browser');

const [url, uri, password, target] = process.argv.slice(2);
if (!target) {
  console.error('usage: node jssip-subscriber.js WS_URL SIP_URI PASSWORD TARGET_URI');
  process.exit(2);
}

installBrowser({ webrtc: false });

function event(...parts) {
  process.stdout.write(parts.join(' ') + '\n');
}

const ua = new JsSIP.UA({
  sockets: [new JsSIP.WebSocketInterface(url)],
  uri,
  password,
  register: false,
  user_agent: 'JsSIP (careflow-sip interop)',
});

function dialogStates(body) {
  const states = [...body.matchAll(/<state[^>]*>([a-z]+)<\/state>/g)].map((m) => m[1]);
  return states.length ? states.join(',') : 'idle';
}

function presence(body) {
  const basic = /<basic>([a-z]+)<\/basic>/.exec(body);
  if (!basic) return 'unreadable';
  if (basic[1] === 'open' && /<rpid:on-the-phone\/>/.test(body)) return 'on-the-phone';
  return basic[1];
}

const subs = [];
function watch(name, accept, describe) {
  const s = ua.subscribe(target, name, accept, { expires: 600 });
  s.on('active', () => event(`${name}-active`));
  s.on('notify', (isFinal, request, body, contentType) => {
    if (contentType !== accept) {
      event(`${name}-wrong-type`, contentType);
      return;
    }
    event(name, describe(body || ''));
  });
  s.on('terminated', (code) => event(`${name}-terminated`, code));
  s.subscribe();
  subs.push(s);
}

ua.on('connected', () => {
  watch('dialog', 'application/dialog-info+xml', dialogStates);
  watch('presence', 'application/pidf+xml', presence);
});

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() === 'stop') {
    subs.forEach((s) => s.terminate());
    setTimeout(() => {
      ua.stop();
      event('done');
      setTimeout(() => process.exit(0), 300);
    }, 1000);
  }
});

ua.start();
