// CareFlow SIP dashboard: plain JavaScript, no build step, served by careflow-sip itself.
// It talks to the same /api/sip/* and /api/admin/* endpoints as CareFlow does. The sign-in
// (a CareFlow token or an admin API key) lives in sessionStorage: this tab only, gone when it
// closes. A freshly generated SIP password lives in memory only, for the guides and downloads.
'use strict';

(function () {
  const $ = (sel) => document.querySelector(sel);
  const STORE = 'careflow-sip.session';
  const RETRY_MS = 1000;

  const state = {
    session: null, // {kind: 'user'|'admin', secret, name}
    creds: null, // GET /api/sip/credentials
    password: null, // shown once, kept in memory for the guides
    devices: [], // with expiresAt (ms)
    fetchedAt: 0,
    ticker: null,
    events: null, // AbortController of the /api/sip/events stream
    live: false, // that stream is open
  };

  // ---------- helpers ----------

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  }

  function announce(text) {
    const live = $('#live');
    live.textContent = '';
    setTimeout(() => { live.textContent = text; }, 50);
  }

  function banner(text, kind) {
    const b = $('#banner');
    clearTimeout(state.bannerTimer);
    if (!text) {
      b.hidden = true;
      b.textContent = '';
      return;
    }
    // Confirmations go away by themselves; problems stay until the next action.
    if (kind === 'info') state.bannerTimer = setTimeout(() => banner(null), 6000);
    b.textContent = text;
    b.className = 'banner' + (kind === 'info' ? ' info' : '');
    b.setAttribute('role', kind === 'info' ? 'status' : 'alert');
    b.hidden = false;
  }

  function ago(seconds) {
    return seconds < 5 ? 'just now' : `${duration(seconds)} ago`;
  }

  function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    const h = Math.floor(seconds / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    const s = seconds % 60;
    if (h) return `${h} h ${m} min`;
    if (m) return `${m} min ${String(s).padStart(2, '0')} s`;
    return `${s} s`;
  }

  function when(unixSeconds) {
    return new Date(unixSeconds * 1000).toLocaleString();
  }

  // A user agent string reduced to something a clinician recognises.
  function deviceName(ua) {
    if (!ua) return 'Unknown device';
    const known = [
      [/yealink/i, 'Yealink'], [/cisco|linksys|spa\d/i, 'Cisco'], [/microsip/i, 'MicroSIP'],
      [/groundwire|acrobits/i, 'Groundwire'], [/linphone/i, 'Linphone'], [/baresip/i, 'baresip'],
      [/jssip/i, 'CareFlow Web'],
    ];
    for (const [re, name] of known) if (re.test(ua)) return `${name} (${ua})`;
    return ua;
  }

  async function copy(text, what) {
    try {
      await navigator.clipboard.writeText(text);
      announce(`${what} copied`);
      banner(`${what} copied to the clipboard.`, 'info');
    } catch (_) {
      banner(`Copying is blocked by this browser: select the ${what.toLowerCase()} and copy it by hand.`);
    }
  }

  function download(name, text) {
    const url = URL.createObjectURL(new Blob([text], { type: 'text/plain' }));
    const a = el('a', { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  function confirmDialog(title, text, ok) {
    const d = $('#confirm');
    $('#confirm-title').textContent = title;
    $('#confirm-text').textContent = text;
    $('#confirm-ok').textContent = ok;
    return new Promise((resolve) => {
      d.addEventListener('close', () => resolve(d.returnValue === 'ok'), { once: true });
      d.showModal();
    });
  }

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    if (state.session) headers.Authorization = `Bearer ${state.session.secret}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (_) {
      banner('The SIP server cannot be reached. Check your connection; this page retries by itself.');
      throw new ApiError(0, null);
    }
    if ($('#banner').textContent.startsWith('The SIP server cannot be reached')) banner(null);
    if (res.status === 204) return null;
    let data = null;
    const type = res.headers.get('content-type') || '';
    if (type.includes('json')) data = await res.json().catch(() => null);
    if (res.status === 401 && state.session) {
      signOut(state.session.kind === 'admin'
        ? 'The API key was refused. Sign in again.'
        : 'Your sign-in has expired. Open the dashboard from CareFlow again, or paste a new token.');
      throw new ApiError(401, data);
    }
    if (res.status === 429) {
      banner('Too many requests: wait a few seconds and try again.');
    }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }

  // ---------- session ----------

  function saveSession(s) {
    state.session = s;
    if (s) sessionStorage.setItem(STORE, JSON.stringify(s));
    else sessionStorage.removeItem(STORE);
  }

  function tokenName(jwt) {
    try {
      const payload = JSON.parse(atob(jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
      return payload.email || payload.name || payload.sub || 'CareFlow user';
    } catch (_) {
      return null;
    }
  }

  async function signIn(kind, secret) {
    secret = secret.trim();
    if (kind === 'user' && !tokenName(secret)) {
      banner('That is not a CareFlow sign-in token (it should be three parts separated by dots).');
      return;
    }
    saveSession({ kind, secret, name: kind === 'admin' ? 'Administrator' : tokenName(secret) });
    try {
      // Checks the sign-in before showing anything.
      await api('GET', kind === 'admin' ? '/api/admin/subscribers?limit=1' : '/api/sip/status');
    } catch (e) {
      if (e.status !== 401) {
        banner(e.status === 0 ? 'The SIP server cannot be reached.' : `Sign-in failed: ${e.message}`);
        saveSession(null);
      }
      return;
    }
    banner(null);
    start();
  }

  function signOut(message) {
    stopLive();
    saveSession(null);
    state.creds = null;
    state.password = null;
    state.devices = [];
    $('#who').hidden = true;
    $('#tabs').hidden = true;
    for (const v of document.querySelectorAll('.view')) v.hidden = true;
    $('#view-signin').hidden = false;
    $('#token').value = '';
    $('#apikey').value = '';
    if (message) banner(message);
    $('#token').focus();
  }

  // ---------- views ----------

  function show(view) {
    const admin = state.session && state.session.kind === 'admin';
    const allowed = admin ? ['admin'] : ['account', 'devices', 'setup'];
    if (!allowed.includes(view)) view = allowed[0];
    for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== `view-${view}`;
    for (const a of document.querySelectorAll('#tabs a')) {
      a.hidden = !allowed.includes(a.dataset.view);
      if (a.dataset.view === view) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    if (view === 'account') renderAccount();
    if (view === 'devices') {
      renderDevices();
      loadMyCalls();
    }
    if (view === 'setup') renderGuide();
    if (view === 'admin') loadAdmin();
    return view;
  }

  function route() {
    if (!state.session) return;
    if (!$('#banner').classList.contains('info')) banner(null);
    const view = show((location.hash || '#').slice(1));
    const h = $(`#view-${view} h1`);
    if (h) {
      h.setAttribute('tabindex', '-1');
      h.focus();
    }
  }

  async function start() {
    $('#view-signin').hidden = true;
    $('#who').hidden = false;
    $('#who-name').textContent = state.session.name;
    $('#tabs').hidden = false;
    if (state.session.kind === 'user') {
      await loadCredentials();
      startLive();
    }
    route();
  }

  // ---------- my SIP account ----------

  async function loadCredentials() {
    try {
      state.creds = await api('GET', '/api/sip/credentials');
    } catch (e) {
      if (e.status === 404) state.creds = null;
      else if (e.status !== 401 && e.status !== 0) banner(`Could not load your SIP account: ${e.message}`);
      if (e.status === 404 || e.status === 401) state.creds = null;
    }
    renderAccount();
  }

  function servers(cfg) {
    const rows = [];
    const t = cfg.transports || [];
    if (t.includes('udp')) rows.push(['UDP', `${cfg.domain}:${cfg.port}`, 'Desk phones on the clinic network']);
    if (t.includes('tcp')) rows.push(['TCP', `${cfg.domain}:${cfg.port}`, 'Phones that cannot use UDP']);
    if (cfg.tlsPort) rows.push(['TLS', `${cfg.domain}:${cfg.tlsPort}`, 'Recommended: encrypted signalling (softphones, phones outside the clinic)']);
    if (cfg.wsUrl) rows.push(['WSS', cfg.wsUrl, 'CareFlow Web and other browser phones']);
    return rows;
  }

  function renderAccount() {
    const c = state.creds;
    $('#account-none').hidden = !!c;
    $('#account-details').hidden = !c;
    $('#password-once').hidden = !state.password;
    if (state.password) $('#new-password').textContent = state.password;
    if (!c) return;
    $('#sip-username').textContent = c.sipUsername;
    $('#sip-uri').textContent = c.sipUri;
    $('#sip-domain').textContent = c.sipConfig.domain;
    $('#sip-enabled').textContent = c.enabled ? 'Active' : 'Disabled by an administrator';
    $('#sip-created').textContent = when(c.createdAt);
    const body = $('#servers');
    body.replaceChildren(...servers(c.sipConfig).map(([t, addr, use]) => el('tr', {},
      el('td', { 'data-label': 'Transport' }, el('strong', { text: t })),
      el('td', { 'data-label': 'Address' }, el('code', { text: addr }),
        el('button', { type: 'button', class: 'copy', onclick: () => copy(addr, `${t} address`) }, 'Copy')),
      el('td', { 'data-label': 'Use it for', text: use }))));
  }

  function newPassword(data) {
    state.password = data.sipPassword;
    state.creds = Object.assign({}, state.creds || {}, {
      sipUsername: data.sipUsername,
      sipUri: data.sipUri,
      sipConfig: data.sipConfig,
      enabled: true,
      createdAt: (state.creds && state.creds.createdAt) || Math.floor(Date.now() / 1000),
    });
    renderAccount();
    $('#password-once h2').setAttribute('tabindex', '-1');
    $('#password-once h2').focus();
    announce('Your new SIP password is shown once. Copy it now.');
  }

  async function generate() {
    try {
      newPassword(await api('POST', '/api/sip/register', {}));
      await loadCredentials();
      startLive();
    } catch (e) {
      if (e.status === 409) {
        banner('You already have SIP credentials. Rotate the password if you need a new one.');
        await loadCredentials();
        startLive();
      } else if (e.status !== 401 && e.status !== 0) {
        banner(`Could not generate credentials: ${e.message}`);
      }
    }
  }

  async function rotate() {
    const ok = await confirmDialog('Rotate your SIP password?',
      'Every phone using the current password is signed out and must be given the new one.', 'Rotate password');
    if (!ok) return;
    try {
      newPassword(await api('POST', '/api/sip/credentials/rotate', {}));
      await loadDevices();
    } catch (e) {
      if (e.status !== 401 && e.status !== 0) banner(`Could not rotate the password: ${e.message}`);
    }
  }

  async function revoke() {
    const ok = await confirmDialog('Revoke your SIP credentials?',
      'Your phones are signed out and can no longer register or call. You can generate new credentials later.',
      'Revoke credentials');
    if (!ok) return;
    try {
      await api('DELETE', '/api/sip/credentials');
      state.creds = null;
      state.password = null;
      banner('Your SIP credentials were revoked.', 'info');
      renderAccount();
      await loadDevices();
    } catch (e) {
      if (e.status !== 401 && e.status !== 0) banner(`Could not revoke: ${e.message}`);
    }
  }

  // ---------- my devices ----------
  // A push device sleeps between calls and is woken for each: reachable, not offline.
  function deviceState(d) {
    if (d.push) {
      return el('span', { class: 'badge online', title: `Woken for calls by ${d.push === 'apns' ? 'Apple' : 'Google'} push`, text: 'Sleeping, push-enabled' });
    }
    return el('span', { class: 'badge online', text: 'Online' });
  }


  async function loadDevices() {
    let status;
    try {
      status = await api('GET', '/api/sip/status');
    } catch (_) {
      return;
    }
    applyStatus(status);
  }

  // The devices as /api/sip/status, or a `status` event of /api/sip/events, lists them.
  function applyStatus(status) {
    const now = Date.now();
    const before = new Set(state.devices.map((d) => d.id));
    state.devices = (status.devices || []).map((d) => Object.assign({}, d, { expiresAt: now + d.expiresIn * 1000 }));
    state.fetchedAt = now;
    const after = new Set(state.devices.map((d) => d.id));
    for (const d of state.devices) if (!before.has(d.id) && state.fetchedAt && before.size + after.size > 0) announce(`${deviceName(d.userAgent)} is online`);
    for (const id of before) if (!after.has(id)) announce('A device went offline');
    renderDevices();
  }

  function renderDevices() {
    const online = state.devices.length > 0;
    const badge = $('#online-badge');
    badge.textContent = online ? `Online · ${state.devices.length} device${state.devices.length > 1 ? 's' : ''}` : 'Offline';
    badge.className = 'badge' + (online ? ' online' : '');
    if (state.fetchedAt) $('#devices-updated').textContent = `Updated ${new Date(state.fetchedAt).toLocaleTimeString()} · ${state.live ? 'live' : 'connecting…'}`;
    $('#no-devices').hidden = online;
    const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.device : null;
    const rows = state.devices.map((d) => el('tr', { 'data-device-row': String(d.id) },
      el('td', { 'data-label': 'Device', text: deviceName(d.userAgent) }),
      el('td', { 'data-label': 'Transport', text: d.transport.toUpperCase() }),
      el('td', { 'data-label': 'Address' }, el('code', { text: d.sourceAddress })),
      el('td', { 'data-label': 'Registered since', text: when(d.registeredAt) }),
      el('td', { 'data-label': 'Expires in', class: 'expires', 'data-expires': String(d.expiresAt) }, duration((d.expiresAt - Date.now()) / 1000)),
      el('td', { 'data-label': 'State' }, deviceState(d)),
      el('td', {}, el('button', {
        type: 'button', class: 'small danger', 'data-device': String(d.id),
        'aria-label': `Deregister ${deviceName(d.userAgent)}`,
        onclick: () => deregister(d),
      }, 'Deregister'))));
    $('#devices').replaceChildren(...rows);
    if (focused) {
      const again = document.querySelector(`button[data-device="${focused}"]`);
      if (again) again.focus();
    }
  }

  function tick() {
    for (const td of document.querySelectorAll('td.expires')) {
      td.textContent = duration((Number(td.dataset.expires) - Date.now()) / 1000);
    }
  }

  async function deregister(d) {
    try {
      const r = await api('POST', '/api/sip/deregister', { id: d.id });
      announce(r && r.removed ? `${deviceName(d.userAgent)} deregistered` : 'The device was already gone');
      banner(`${deviceName(d.userAgent)} was deregistered. It registers again by itself unless you change its password.`, 'info');
    } catch (e) {
      if (e.status !== 401 && e.status !== 0) banner(`Could not deregister: ${e.message}`);
    }
    await loadDevices();
  }

  // The device list follows /api/sip/events (server-sent events over fetch, which can carry
  // the bearer token where EventSource cannot): no polling. A dropped stream is opened again,
  // 1 s then up to 30 s apart, saying so while the server cannot be reached.
  function startLive() {
    stopLive();
    loadDevices();
    state.ticker = setInterval(tick, 1000);
    if (state.creds) openEvents();
  }

  function stopLive() {
    clearInterval(state.ticker);
    if (state.events) state.events.abort();
    state.events = null;
    state.live = false;
  }

  const UNREACHABLE = 'The SIP server cannot be reached. Check your connection; this page retries by itself.';

  async function openEvents() {
    if (state.events) state.events.abort();
    const ctrl = new AbortController();
    state.events = ctrl;
    let delay = RETRY_MS;
    while (!ctrl.signal.aborted && state.session) {
      try {
        const res = await fetch('/api/sip/events', {
          headers: { Accept: 'text/event-stream', Authorization: `Bearer ${state.session.secret}` },
          cache: 'no-store',
          signal: ctrl.signal,
        });
        if (res.status === 401) {
          signOut('Your sign-in has expired. Open the dashboard from CareFlow again, or paste a new token.');
          return;
        }
        if (res.status === 404) return; // no credentials (any more): opened again when made
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        if ($('#banner').textContent === UNREACHABLE) banner(null);
        delay = RETRY_MS;
        await readEvents(res.body, ctrl.signal);
      } catch (_) {
        if (ctrl.signal.aborted) return;
      }
      state.live = false;
      if (ctrl.signal.aborted) return;
      banner(UNREACHABLE);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 30000);
    }
  }

  async function readEvents(body, signal) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    signal.addEventListener('abort', () => reader.cancel().catch(() => {}));
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value.replace(/\r\n/g, '\n');
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        let name = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) name = line.slice(6).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        }
        if (data.length) onEvent(name, data.join('\n'));
      }
    }
  }

  function onEvent(name, data) {
    let value;
    try {
      value = JSON.parse(data);
    } catch (_) {
      return;
    }
    if (name === 'status') {
      state.live = true;
      applyStatus(value);
    } else if (name === 'call') {
      if (value.type === 'call.missed') announce(`Missed call from ${String(value.detail && value.detail.caller || 'someone')}`);
      if (value.type !== 'call.answered') loadMyCalls();
    }
  }

  // ---------- set up a phone ----------

  const GUIDES = {
    yealink: {
      name: 'Yealink T46S / T54S desk phone',
      transport: 'tls',
      steps: (v) => [
        `Open the phone's web page (press OK on the phone to see its IP address) and sign in as admin.`,
        `Go to Account → Register → Account 1. Set Line Active to On, Label to "CareFlow".`,
        `Register Name and User Name: ${v.user}. Password: ${v.password}.`,
        `SIP Server 1: ${v.domain}, port ${v.port}, Transport ${v.transportLabel}.`,
        `Under Account → Advanced set NAT Keep-alive (UDP Keep-alive) to Enabled, every 30 seconds.`,
        `Confirm. The line key turns green and the phone appears under My devices.`,
        `Busy lamps for colleagues: Dsskey → Line Key 2 (and on), Type BLF, Value: the colleague's SIP username, Line 1. The key is green when they are free, blinks red while their phone rings (press it to take the call) and is red while they are on a call.`,
      ],
      file: (v) => ({
        name: `careflow-${v.user}.cfg`,
        label: 'Download Yealink configuration (.cfg)',
        text: [
          '#!version:1.0.0.1',
          '## CareFlow SIP account for Yealink T4x/T5x (import under Settings → Configuration).',
          'account.1.enable = 1',
          'account.1.label = CareFlow',
          `account.1.display_name = ${v.user}`,
          `account.1.auth_name = ${v.user}`,
          `account.1.user_name = ${v.user}`,
          `account.1.password = ${v.rawPassword || ''}`,
          `account.1.sip_server.1.address = ${v.domain}`,
          `account.1.sip_server.1.port = ${v.port}`,
          `account.1.sip_server.1.transport_type = ${{ udp: 0, tcp: 1, tls: 2 }[v.transport]}`,
          'account.1.sip_server.1.expires = 300',
          'account.1.nat.udp_update_enable = 1',
          'account.1.nat.udp_update_time = 30',
          '## A busy lamp (BLF) per colleague: uncomment and put their SIP username as the value.',
          '# linekey.2.type = 16',
          '# linekey.2.line = 1',
          '# linekey.2.value = COLLEAGUE-SIP-USERNAME',
          '# linekey.2.label = Colleague',
          '',
        ].join('\n'),
      }),
    },
    spa303: {
      name: 'Cisco SPA303 desk phone',
      transport: 'udp',
      steps: (v) => [
        `Open http://PHONE-IP/admin/advanced in a browser (the phone shows its IP under Settings → Network).`,
        `Go to Voice → Ext 1. Line Enable: yes.`,
        `Proxy: ${v.domain}:${v.port}. Register: yes. Make Call Without Reg: no.`,
        `User ID: ${v.user}. Password: ${v.password}. Use Auth ID: no.`,
        `NAT Keep Alive Enable: yes. Submit All Changes; the phone restarts and registers.`,
        `The SPA303 has no TLS: it uses UDP, so keep it on the clinic network.`,
        `Busy lamps for colleagues: Voice → Phone → Line Key 2: Extension Disabled, Extended Function fnc=blf+cp;sub=COLLEAGUE@${v.domain} (their SIP username). The key blinks while their phone rings; press it to take the call.`,
      ],
      file: (v) => ({
        name: `careflow-${v.user}-spa303.xml`,
        label: 'Download SPA303 profile (.xml)',
        text: [
          '<flat-profile>',
          '  <Line_Enable_1_>Yes</Line_Enable_1_>',
          `  <Proxy_1_>${v.domain}:${v.port}</Proxy_1_>`,
          '  <Register_1_>Yes</Register_1_>',
          `  <Display_Name_1_>${v.user}</Display_Name_1_>`,
          `  <User_ID_1_>${v.user}</User_ID_1_>`,
          `  <Password_1_>${v.rawPassword || ''}</Password_1_>`,
          '  <NAT_Keep_Alive_Enable_1_>Yes</NAT_Keep_Alive_Enable_1_>',
          '</flat-profile>',
          '',
        ].join('\n'),
      }),
    },
    microsip: {
      name: 'MicroSIP (Windows)',
      transport: 'tls',
      steps: (v) => [
        `Open the menu (arrow at the top right) → Add Account.`,
        `SIP Server: ${v.domain}:${v.port}. SIP Proxy: leave empty.`,
        `Username and Login: ${v.user}. Domain: ${v.domain}. Password: ${v.password}.`,
        `Transport: ${v.transportLabel}. Public Address: Auto. Save.`,
      ],
    },
    groundwire: {
      name: 'Groundwire (iPhone, Android)',
      transport: 'tls',
      steps: (v) => [
        `Settings → Accounts → Add Account → Generic SIP Account.`,
        `Title: CareFlow. Username: ${v.user}. Password: ${v.password}. Domain: ${v.domain}:${v.port}.`,
        `Advanced Settings → Network → SIP Transport: ${v.transportLabel}.`,
        `Keep Push notifications on so calls reach you when the app is in the background (Acrobits' service keeps your registration while the phone sleeps). Save.`,
      ],
    },
    linphone: {
      name: 'Linphone (desktop, iPhone, Android)',
      transport: 'tls',
      qr: true,
      steps: (v) => [
        `Fastest: press "Show a QR code" below, then in Linphone open the assistant → Fetch remote configuration → scan the QR code. The code works once, for 10 minutes; it carries no password.`,
        `Or by hand: open the assistant → Use a SIP account.`,
        `Username: ${v.user}. Password: ${v.password}. Domain: ${v.domain}:${v.port}.`,
        `Transport: ${v.transportLabel}. Log in.`,
        `On a phone: Linphone from the app store cannot be woken by this server (its pushes come from its publisher); it rings while it is open. To be reached with the app closed, use the CareFlow app or Groundwire.`,
      ],
    },
    baresip: {
      name: 'baresip (Linux)',
      transport: 'tls',
      steps: (v) => [
        `Add the line below to ~/.baresip/accounts (or download it), then start baresip.`,
        `baresip registers at once; type /reginfo to see the registration.`,
      ],
      file: (v) => ({
        name: 'accounts',
        label: 'Download baresip accounts line',
        text: `<sip:${v.user}@${v.domain};transport=${v.transport}>;auth_pass=${v.rawPassword || 'YOUR-SIP-PASSWORD'};outbound="sip:${v.domain}:${v.port};transport=${v.transport}";regint=300\n`,
      }),
      show: true,
    },
    web: {
      name: 'CareFlow Web (browser)',
      transport: 'wss',
      steps: (v) => [
        `CareFlow Web connects with your account by itself; there is nothing to type.`,
        `It uses the secure WebSocket address ${v.wsUrl || '(not enabled on this server)'} with your username ${v.user}.`,
        `Allow microphone access when the browser asks.`,
      ],
    },
  };

  function guideValues(kind) {
    const c = state.creds;
    const cfg = c.sipConfig;
    let transport = GUIDES[kind].transport;
    if (transport === 'tls' && !cfg.tlsPort) transport = 'udp';
    const port = transport === 'tls' ? cfg.tlsPort : cfg.port;
    return {
      user: c.sipUsername,
      domain: cfg.domain,
      port,
      transport,
      transportLabel: transport.toUpperCase(),
      wsUrl: cfg.wsUrl,
      rawPassword: state.password,
      password: state.password || 'your SIP password (shown once when generated; rotate it on My SIP account to get a new one)',
    };
  }

  function renderGuide() {
    const select = $('#device-kind');
    if (!select.options.length) {
      for (const [k, g] of Object.entries(GUIDES)) select.append(el('option', { value: k, text: g.name }));
      select.addEventListener('change', renderGuide);
    }
    const box = $('#guide');
    if (!state.creds) {
      box.replaceChildren(el('p', { text: 'Generate your SIP credentials on My SIP account first; the guides then show your own values.' }));
      return;
    }
    const kind = select.value;
    const g = GUIDES[kind];
    const v = guideValues(kind);
    const parts = [
      el('h2', { text: g.name }),
      el('p', { class: 'transport' }, 'Use ', el('strong', { text: v.transportLabel }),
        kind === 'web' ? '' : ` on port ${v.port}.`),
      el('ol', {}, ...g.steps(v).map((s) => el('li', { text: s }))),
    ];
    if (!state.password) {
      parts.push(el('p', { class: 'fineprint', text: 'The password is not filled in: it is shown only once. Rotate it on My SIP account to fill it in here and in the downloads.' }));
    }
    if (g.qr) {
      const qrBox = el('div', { id: 'qr-box', 'aria-live': 'polite' });
      parts.push(el('button', { type: 'button', id: 'show-qr', onclick: () => showQr(qrBox) }, 'Show a QR code'), qrBox);
    }
    if (g.file) {
      const f = g.file(v);
      if (g.show) parts.push(el('pre', {}, el('code', { id: 'guide-file', text: f.text })));
      parts.push(el('button', { type: 'button', id: 'guide-download', onclick: () => download(f.name, f.text) }, f.label));
    }
    box.replaceChildren(...parts);
  }

  async function showQr(box) {
    let link;
    try {
      link = await api('POST', '/api/sip/provisioning', { baseUrl: location.origin });
    } catch (e) {
      if (e.status !== 401 && e.status !== 0) banner(`Could not make a QR code: ${e.message}`);
      return;
    }
    const img = el('img', {
      id: 'provision-qr',
      class: 'qr',
      width: '240',
      height: '240',
      alt: 'QR code with a one-time link to your SIP account for Linphone',
      src: `data:image/svg+xml;base64,${btoa(link.qrSvg)}`,
    });
    box.replaceChildren(img,
      el('p', { class: 'fineprint' }, `Valid once, for ${Math.round(link.expiresIn / 60)} minutes: `,
        el('code', { id: 'provision-url', text: link.url })));
    announce('QR code shown');
  }

  // ---------- administration ----------

  async function loadAdmin() {
    await Promise.all([adminUsers(), adminDevices(), adminPhones(), adminSecurity(), adminCalls(), adminAudit()]);
  }

  const OUTCOMES = {
    answered: 'Answered', no_answer: 'No answer', busy: 'Busy', cancelled: 'Cancelled',
    rejected: 'Declined', failed: 'Failed',
  };

  function whenMs(ms) {
    return new Date(ms).toLocaleString();
  }

  async function adminCalls() {
    let page;
    try {
      page = await api('GET', '/api/admin/calls?limit=20');
    } catch (_) {
      return;
    }
    $('#admin-calls').replaceChildren(...page.calls.map((c) => el('tr', {},
      el('td', { text: whenMs(c.inviteAt) }),
      el('td', {}, el('code', { text: c.caller })),
      el('td', {}, el('code', { text: c.callee || c.dialled })),
      el('td', { text: `${OUTCOMES[c.disposition] || c.disposition} (${c.finalCode})` }),
      el('td', { text: c.talkSeconds ? duration(c.talkSeconds) : '—' }),
      el('td', { text: c.endedBy }))));
    if (!page.calls.length) $('#admin-calls').replaceChildren(el('tr', {}, el('td', { colspan: '6', text: 'No call yet.' })));
  }

  async function adminAudit() {
    let page;
    try {
      page = await api('GET', '/api/admin/audit?limit=20');
    } catch (_) {
      return;
    }
    $('#admin-audit').replaceChildren(...page.entries.map((e) => el('tr', {},
      el('td', { text: String(e.seq) }),
      el('td', { text: whenMs(e.at) }),
      el('td', {}, el('code', { text: e.actor })),
      el('td', {}, el('code', { text: e.source })),
      el('td', { text: e.action }),
      el('td', {}, el('code', { text: e.target })),
      el('td', { text: e.outcome }))));
  }

  // Exports carry the API key, so they are fetched here and saved from memory.
  async function exportFile(path, name) {
    try {
      const res = await fetch(path, { headers: { Authorization: `Bearer ${state.session.secret}` }, cache: 'no-store' });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const blob = await res.blob();
      const url = URL.createObjectURL(blob);
      const a = el('a', { href: url, download: name });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
      announce(`${name} downloaded`);
    } catch (e) {
      banner(`Could not export: ${e.message}`);
    }
  }

  async function loadMyCalls() {
    if (!state.creds) return;
    let page;
    try {
      page = await api('GET', '/api/sip/calls?limit=20');
    } catch (_) {
      return;
    }
    const me = `${state.creds.sipUsername}@${state.creds.sipConfig.domain}`;
    $('#my-calls').replaceChildren(...page.calls.map((c) => {
      const out = c.caller === me;
      return el('tr', {},
        el('td', { 'data-label': 'When', text: whenMs(c.inviteAt) }),
        el('td', { 'data-label': 'Direction', text: out ? 'Outgoing' : 'Incoming' }),
        el('td', { 'data-label': 'With' }, el('code', { text: out ? (c.callee || c.dialled) : c.caller })),
        el('td', { 'data-label': 'Outcome', text: OUTCOMES[c.disposition] || c.disposition }),
        el('td', { 'data-label': 'Talk time', text: c.talkSeconds ? duration(c.talkSeconds) : '—' }));
    }));
    if (!page.calls.length) $('#my-calls').replaceChildren(el('tr', {}, el('td', { colspan: '5', text: 'No call yet.' })));
  }

  async function adminUsers() {
    const q = $('#user-q').value.trim();
    let users;
    let bindings;
    try {
      users = await api('GET', `/api/admin/subscribers?limit=100${q ? `&q=${encodeURIComponent(q)}` : ''}`);
      bindings = await api('GET', '/api/admin/bindings');
    } catch (e) {
      if (e.status !== 401 && e.status !== 0) banner(`Could not load users: ${e.message}`);
      return;
    }
    const count = {};
    for (const b of bindings) count[b.aor] = (count[b.aor] || 0) + 1;
    $('#admin-users').replaceChildren(...users.map((u) => el('tr', {},
      el('td', {}, el('code', { text: u.username })),
      el('td', { text: u.email || '—' }),
      el('td', { text: u.careflowUserId || '—' }),
      el('td', {}, el('span', { class: 'badge' + (u.enabled ? ' online' : ''), text: u.enabled ? 'Active' : 'Disabled' })),
      el('td', { text: String(count[`${u.username}@${u.domain}`] || 0) }))));
    if (!users.length) $('#admin-users').replaceChildren(el('tr', {}, el('td', { colspan: '5', text: 'No user matches.' })));
  }

  // ---------- desk phones (auto-provisioning) ----------

  async function adminPhones() {
    let list;
    try {
      list = await api('GET', '/api/admin/devices');
    } catch (_) {
      return;
    }
    $('#admin-phones').replaceChildren(...list.map((d) => el('tr', {},
      el('td', {}, el('code', { text: d.mac })),
      el('td', { text: d.model }),
      el('td', {}, el('code', { text: d.username })),
      el('td', { text: d.blf.length ? d.blf.join(', ') : '—' }),
      el('td', { text: d.lastFetchAt ? `${new Date(d.lastFetchAt * 1000).toLocaleString()} from ${d.lastFetchFrom}` : 'never' }),
      el('td', {},
        el('button', { type: 'button', class: 'small', 'aria-label': `New SIP password for ${d.mac}`, onclick: () => phoneAction(d.mac, 'rotate') }, 'New SIP password'),
        ' ',
        el('button', { type: 'button', class: 'small', 'aria-label': `Remove ${d.mac}`, onclick: () => phoneAction(d.mac, 'remove') }, 'Remove')))));
    if (!list.length) $('#admin-phones').replaceChildren(el('tr', {}, el('td', { colspan: '6', text: 'No desk phone is provisioned.' })));
  }

  async function phoneAction(mac, action) {
    try {
      if (action === 'remove') {
        if (!window.confirm(`Remove ${mac}? Its credentials stop at once.`)) return;
        await api('DELETE', `/api/admin/devices/${mac}`);
        announce(`${mac} removed`);
      } else {
        const r = await api('POST', `/api/admin/devices/${mac}/rotate`);
        if (r && r.userPassword) {
          banner(`${mac} shares its user's password: the user's new SIP password is ${r.userPassword} (shown only now; the old one works for the grace period).`);
        } else {
          banner(`${mac} gets a new SIP password at its next configuration fetch; the old one works for the grace period.`, 'info');
        }
      }
    } catch (e) {
      banner(`Could not change ${mac}: ${(e.problem && e.problem.detail) || e.message}`);
    }
    adminPhones();
  }

  async function addPhone(e) {
    e.preventDefault();
    const blf = $('#device-blf').value.split(',').map((b) => b.trim()).filter((b) => b);
    try {
      const r = await api('POST', '/api/admin/devices', {
        mac: $('#device-mac').value.trim(),
        model: $('#device-model').value,
        username: $('#device-user').value.trim(),
        blf,
        shared: $('#device-shared').checked,
      });
      const box = $('#device-secret');
      box.replaceChildren(
        el('p', { text: `Added ${r.device.mac}. Its provisioning password is shown only now:` }),
        el('p', {}, el('code', { id: 'device-password', text: r.provisioningPassword })),
        r.provisioningUrl ? el('p', {}, 'Provisioning URL for the phone (or its DHCP option 66): ', el('code', { id: 'device-url', text: r.provisioningUrl })) : null,
        r.userPassword ? el('p', {}, `The user's SIP password is now (shown only now; their other phones and apps need it): `, el('code', { id: 'device-user-password', text: r.userPassword })) : null);
      box.hidden = false;
      $('#device-add').reset();
      announce(`${r.device.mac} added`);
    } catch (err) {
      banner(`Could not add the phone: ${(err.problem && err.problem.detail) || err.message}`);
    }
    adminPhones();
  }

  async function adminDevices() {
    let list;
    try {
      list = await api('GET', '/api/admin/bindings');
    } catch (_) {
      return;
    }
    $('#admin-devices').replaceChildren(...list.map((b) => el('tr', {},
      el('td', {}, el('code', { text: b.aor })),
      el('td', { text: deviceName(b.userAgent) }),
      el('td', { text: b.transport.toUpperCase() }),
      el('td', {}, el('code', { text: b.sourceAddress })),
      el('td', {}, el('code', { text: b.node || '-' })),
      el('td', { text: duration(b.expiresIn) + (b.push ? ' · sleeping, push-enabled' : '') }))));
    if (!list.length) $('#admin-devices').replaceChildren(el('tr', {}, el('td', { colspan: '6', text: 'No device is registered.' })));
  }

  async function adminSecurity() {
    let s;
    try {
      s = await api('GET', '/api/admin/security');
    } catch (_) {
      return;
    }
    $('#admin-bans').replaceChildren(...s.bans.map((b) => el('tr', {},
      el('td', {}, el('code', { text: b.port ? (b.ip.includes(':') ? `[${b.ip}]:${b.port}` : `${b.ip}:${b.port}`) : b.ip })),
      el('td', { text: b.reason }),
      el('td', { text: duration(b.remainingSeconds) }))));
    if (!s.bans.length) $('#admin-bans').replaceChildren(el('tr', {}, el('td', { colspan: '3', text: 'No address is blocked.' })));
    $('#admin-failures').replaceChildren(...s.authFailures.map((f) => el('tr', {},
      el('td', { text: ago(f.secondsAgo) }),
      el('td', {}, el('code', { text: f.username || '(none)' })),
      el('td', {}, el('code', { text: f.ip })))));
    if (!s.authFailures.length) $('#admin-failures').replaceChildren(el('tr', {}, el('td', { colspan: '3', text: 'No failed sign-in recently.' })));
  }

  // ---------- wiring ----------

  // CareFlow hands the token over in the fragment (`/#token=...`: never sent to a server, so
  // never in an access log), also to a tab that is already open.
  function takeToken() {
    const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
    if (!m) return false;
    history.replaceState(null, '', location.pathname + '#account');
    stopLive();
    state.creds = null;
    state.password = null;
    state.devices = [];
    signIn('user', decodeURIComponent(m[1]));
    return true;
  }

  function init() {
    for (const b of document.querySelectorAll('button.copy[data-copy]')) {
      const what = b.textContent.replace(/^Copy ?/, '') || $(b.dataset.copy).closest('div').querySelector('dt').textContent;
      b.addEventListener('click', () => copy($(b.dataset.copy).textContent, what.charAt(0).toUpperCase() + what.slice(1)));
    }
    $('#form-user').addEventListener('submit', (e) => {
      e.preventDefault();
      signIn('user', $('#token').value);
    });
    $('#form-admin').addEventListener('submit', (e) => {
      e.preventDefault();
      signIn('admin', $('#apikey').value);
    });
    $('#sign-out').addEventListener('click', () => signOut('You are signed out.'));
    $('#generate').addEventListener('click', generate);
    $('#rotate').addEventListener('click', rotate);
    $('#revoke').addEventListener('click', revoke);
    $('#export-calls-csv').addEventListener('click', () => exportFile('/api/admin/calls/export?format=csv', 'careflow-calls.csv'));
    $('#export-calls-jsonl').addEventListener('click', () => exportFile('/api/admin/calls/export?format=jsonl', 'careflow-calls.jsonl'));
    $('#export-audit-csv').addEventListener('click', () => exportFile('/api/admin/audit/export?format=csv', 'careflow-audit.csv'));
    $('#password-done').addEventListener('click', () => {
      $('#password-once').hidden = true;
      $('#account-title').focus();
    });
    $('#device-add').addEventListener('submit', addPhone);
    $('#user-search').addEventListener('submit', (e) => {
      e.preventDefault();
      adminUsers();
    });
    window.addEventListener('hashchange', () => {
      if (!takeToken()) route();
    });
    if (takeToken()) return;
    const saved = sessionStorage.getItem(STORE);
    if (saved) {
      try {
        state.session = JSON.parse(saved);
        start();
        return;
      } catch (_) {
        saveSession(null);
      }
    }
    signOut(null);
  }

  document.addEventListener('DOMContentLoaded', init);
})();
