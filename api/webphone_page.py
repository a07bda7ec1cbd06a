"""The browser softphone page: one self-contained HTML document (inline CSS and JS).

It loads nothing from other hosts, so it works on an isolated QA box and under the strict
Content-Security-Policy `api.webphone` serves it with. Query parameters let a link (or a
headless test) run a whole scenario: `?target=sip:...&autocall=1&dtmf=1&hangup_after=5
&report=1` calls, presses the keys once answered, hangs up and POSTs what the browser
measured (`pc.getStats()`) to `/v1/webphone/calls/{id}/report`.
"""

from __future__ import annotations

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE"]

# Same-origin fetches only; media may play from the peer connection's MediaStream.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; media-src 'self' blob: mediastream:; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ackline webphone</title>
<style>
  :root { color-scheme: light; }
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232b;
         background: #fafbfc; max-width: 21rem; margin: 2rem auto; padding: 0 1rem; }
  h1 { font-size: 1.15rem; margin: 0 0 1rem; }
  h1 small { font-weight: normal; color: #66707c; }
  label { display: block; font-size: .85rem; margin-bottom: .3rem; color: #3b4550; }
  input { width: 100%; box-sizing: border-box; padding: .55rem; font: .95rem monospace;
          border: 1px solid #b9c1ca; border-radius: 4px; }
  .row { display: flex; gap: .5rem; margin: .8rem 0; }
  .row button { flex: 1; padding: .6rem; font-size: 1rem; border: 0; border-radius: 4px;
                color: #fff; cursor: pointer; }
  #call { background: #1f7a3a; }
  #hangup { background: #b3261e; }
  button:disabled { opacity: .4; cursor: default; }
  .keypad { display: grid; grid-template-columns: repeat(3, 1fr); gap: .5rem; }
  .keypad button { font-size: 1.35rem; padding: .7rem 0; border: 1px solid #c3cad2;
                   border-radius: 6px; background: #fff; cursor: pointer; }
  .keypad button:active:not(:disabled) { background: #e4ebf3; }
  #sent { font: 1rem monospace; min-height: 1.3rem; margin: .7rem 0 0; letter-spacing: .15em; }
  #status { margin-top: .7rem; padding: .55rem; background: #eef2f6; border-radius: 4px;
            font: .85rem monospace; min-height: 1.2rem; white-space: pre-wrap; }
  #status[data-state="answered"] { background: #e3f3e7; }
  #status[data-state="ended"], #status[data-state="error"] { background: #f7e9e8; }
</style>
</head>
<body>
<h1>ackline webphone <small>QA softphone</small></h1>
<label for="target">Call target (SIP URI)</label>
<input id="target" placeholder="sip:hotline@127.0.0.1:5060" autocomplete="off"
       spellcheck="false">
<div class="row">
  <button id="call" type="button">Call</button>
  <button id="hangup" type="button" disabled>Hang up</button>
</div>
<div class="keypad" id="keypad">
  <button type="button" data-key="1">1</button><button type="button" data-key="2">2</button>
  <button type="button" data-key="3">3</button><button type="button" data-key="4">4</button>
  <button type="button" data-key="5">5</button><button type="button" data-key="6">6</button>
  <button type="button" data-key="7">7</button><button type="button" data-key="8">8</button>
  <button type="button" data-key="9">9</button><button type="button" data-key="*">*</button>
  <button type="button" data-key="0">0</button><button type="button" data-key="#">#</button>
</div>
<div id="sent" aria-label="keys sent"></div>
<div id="status" role="status" data-state="idle">idle</div>
<audio id="remote" autoplay></audio>
<script>
"use strict";
const API = "/v1/webphone/calls";
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const num = (name, dflt) => {
  const v = Number(params.get(name));
  return params.has(name) && Number.isFinite(v) ? v : dflt;
};
let pc = null, mic = null, callId = null, poller = null, last = null;
let busy = false, answeredAt = null;
const waiters = [];

function show(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function refreshButtons() {
  const live = busy || (last !== null && last.state !== "ended");
  $("call").disabled = live;
  $("hangup").disabled = !live;
  const answered = last !== null && last.state === "answered";
  for (const b of $("keypad").querySelectorAll("button")) b.disabled = !answered;
}

function describe(s) {
  const parts = [s.state];
  if (s.sip_code) parts.push(String(s.sip_code));
  if (s.reason) parts.push(s.reason);
  if (s.error) parts.push(s.error);
  return parts.join(" ") + (s.target ? "\\n" + s.target : "");
}

async function errorText(r) {
  try {
    const body = await r.json();
    const d = body.detail;
    return Array.isArray(d) ? d.join("; ") : String(d || r.status);
  } catch (e) {
    return "HTTP " + r.status;
  }
}

function gathered(conn, ms) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    conn.addEventListener("icegatheringstatechange", () => {
      if (conn.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

function releaseMedia() {
  if (mic) { for (const t of mic.getTracks()) t.stop(); mic = null; }
  if (pc) { pc.close(); pc = null; }
  $("remote").srcObject = null;
}

async function startCall() {
  const target = $("target").value.trim();
  if (!target) { show("enter a SIP URI to call", "error"); return; }
  busy = true; last = null; answeredAt = null; $("sent").textContent = "";
  refreshButtons();
  try {
    show("opening the microphone", "starting");
    const raw = params.get("processing") === "0";
    mic = await navigator.mediaDevices.getUserMedia({
      audio: raw ? {echoCancellation: false, noiseSuppression: false, autoGainControl: false}
                 : true,
      video: false,
    });
    pc = new RTCPeerConnection({iceServers: []});
    for (const t of mic.getTracks()) pc.addTrack(t, mic);
    pc.ontrack = (ev) => { $("remote").srcObject = ev.streams[0] || new MediaStream([ev.track]); };
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, 5000);
    show("sending the offer", "starting");
    const r = await fetch(API, {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({sdp: pc.localDescription.sdp, type: "offer", target}),
    });
    if (!r.ok) throw new Error(await errorText(r));
    const answer = await r.json();
    callId = answer.id;
    await pc.setRemoteDescription({type: answer.type, sdp: answer.sdp});
    show("connecting", "connecting");
    poller = setInterval(poll, 500);
    await poll();
  } catch (err) {
    show("error: " + err.message, "error");
    releaseMedia();
  } finally {
    busy = false;
    refreshButtons();
  }
}

async function poll() {
  if (!callId) return;
  let s;
  try {
    const r = await fetch(API + "/" + callId, {cache: "no-store"});
    if (!r.ok) throw new Error(await errorText(r));
    s = await r.json();
  } catch (err) {
    show("lost the server: " + err.message, "error");
    return;
  }
  last = s;
  if (s.state === "answered" && answeredAt === null) answeredAt = Date.now();
  show(describe(s), s.state);
  refreshButtons();
  for (const w of waiters.splice(0)) w(s);
  if (s.state === "ended") {
    clearInterval(poller); poller = null;
    releaseMedia();
  }
}

function nextState() { return new Promise((resolve) => waiters.push(resolve)); }

async function press(key) {
  if (!callId || !last || last.state !== "answered") return;
  $("sent").textContent += key;
  const r = await fetch(API + "/" + callId + "/dtmf", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({digits: key, method: params.get("dtmf_method") || "rfc4733"}),
  });
  if (!r.ok) show("key " + key + " not sent: " + (await errorText(r)), "error");
}

async function hangUp() {
  if (!callId) { releaseMedia(); return; }
  $("hangup").disabled = true;
  const r = await fetch(API + "/" + callId, {method: "DELETE"});
  if (r.ok) { const s = await r.json(); last = s; show(describe(s), s.state); }
  await poll();
  releaseMedia();
  refreshButtons();
}

async function measure() {
  const out = {inbound: null, outbound: null, source: null, pair: null};
  if (!pc) return out;
  const stats = await pc.getStats();
  const byId = new Map();
  stats.forEach((s) => byId.set(s.id, s));
  stats.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      out.inbound = {packetsReceived: s.packetsReceived, bytesReceived: s.bytesReceived,
                     packetsLost: s.packetsLost, jitter: s.jitter, audioLevel: s.audioLevel,
                     totalAudioEnergy: s.totalAudioEnergy,
                     totalSamplesDuration: s.totalSamplesDuration};
    } else if (s.type === "outbound-rtp" && s.kind === "audio") {
      out.outbound = {packetsSent: s.packetsSent, bytesSent: s.bytesSent};
    } else if (s.type === "media-source" && s.kind === "audio") {
      out.source = {audioLevel: s.audioLevel, totalAudioEnergy: s.totalAudioEnergy};
    } else if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") {
      const l = byId.get(s.localCandidateId), r = byId.get(s.remoteCandidateId);
      out.pair = {local: l ? l.address + ":" + l.port : null,
                  remote: r ? r.address + ":" + r.port : null};
    }
  });
  return out;
}

async function report(extra) {
  if (!callId) return;
  const body = Object.assign({keys_sent: $("sent").textContent, state: last && last.state},
                             await measure(), extra || {});
  await fetch(API + "/" + callId + "/report", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
}

// A scenario from the URL, bounded in time: call, press keys, hang up, report.
async function autorun() {
  if (params.has("target")) $("target").value = params.get("target");
  if (params.get("autocall") !== "1") return;
  await startCall();
  if (!callId) return;
  const deadline = Date.now() + 1000 * num("answer_timeout", 30);
  while (!last || (last.state !== "answered" && last.state !== "ended")) {
    if (Date.now() > deadline) break;
    await Promise.race([nextState(), sleep(1000)]);
  }
  if (!last || last.state !== "answered") {
    if (params.get("report") === "1") await report({answered: false});
    return;
  }
  await sleep(1000 * num("dtmf_after", 1));
  for (const key of params.get("dtmf") || "") {
    await press(key);
    await sleep(200);
  }
  const hangupAfter = num("hangup_after", 0);
  if (hangupAfter <= 0) return;
  await sleep(Math.max(0, answeredAt + 1000 * hangupAfter - Date.now()));
  if (params.get("report") === "1") await report({answered: true});
  if (last.state !== "ended") await hangUp();
}

$("call").addEventListener("click", startCall);
$("hangup").addEventListener("click", hangUp);
$("keypad").addEventListener("click", (ev) => {
  const key = ev.target.dataset && ev.target.dataset.key;
  if (key) press(key);
});
$("target").addEventListener("keydown", (ev) => { if (ev.key === "Enter") startCall(); });
document.addEventListener("keydown", (ev) => {
  if (ev.target !== $("target") && "0123456789*#".includes(ev.key) && ev.key.length === 1) {
    press(ev.key);
  }
});
// Closing the tab hangs up instead of leaving the SIP call to its time limit.
window.addEventListener("pagehide", () => {
  if (callId && last && last.state !== "ended") {
    navigator.sendBeacon(API + "/" + callId + "/hangup");
  }
});
refreshButtons();
autorun();
</script>
</body>
</html>
"""
