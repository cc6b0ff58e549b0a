// The call page. It places a call the way a page written for OpenAI's realtime WebRTC API
// does: the SDP offer is POSTed to v1/realtime/calls, the answer comes back, and JSON events
// flow on a data channel labelled "oai-events". The assistant's voice arrives as an ordinary
// audio track; the page only listens to it (an AnalyserNode) to show levels and to time
// each turn from the end of your speech to the first sound back.
"use strict";

const CALLS = "v1/realtime/calls";
const LOUD = 0.02; // RMS, 0..1: louder than this counts as sound
const TICK_MS = 20;
const GATHER_TIMEOUT_MS = 3000;
const VIDEO_FPS = 5; // the server samples at most 2 frames per second of this

const $ = (id) => document.getElementById(id);

let call = null; // the call in progress: see startCall
const stats = { remotePeak: 0, latencies: [], events: [] };
window.omni = { get call() { return call; }, stats }; // for tests and the devtools console

class CallError extends Error {}

// -- placing and ending calls

async function startCall(kind) {
  if (call) return;
  clearAlert();
  Object.assign(stats, { remotePeak: 0, latencies: [], events: [] });
  $("transcript").replaceChildren();
  $("latencies").replaceChildren();
  $("transcript-empty").hidden = false;
  const c = (call = {
    kind,
    audio: new AudioContext(), // made inside the click, so it may play
    pc: null, dc: null, location: null,
    mic: null, camera: null, screen: null, videoSender: null,
    maxSide: 448, silenceMs: 500, connected: false, ended: false, lastError: null,
    lastLoudAt: 0, turnEnd: null, you: null, reply: null, replies: new Map(), yours: new Map(),
    local: null, remote: null, timer: null,
  });
  setInCall(true);
  setState("connecting", "Starting…");
  try {
    const config = await fetchConfig();
    c.maxSide = config.video.max_side;
    fillVoices(config.voices);
    c.mic = await openMic();
    c.local = analyser(c.audio, new MediaStream([c.mic]));
    if (kind === "video") c.camera = await openOptional(openCamera);
    if (kind === "screen") c.screen = await openOptional(openScreen);
    if (c.screen) {
      c.screen.addEventListener("ended", () => stopScreen(c)); // the browser's "Stop sharing"
      setSharing(true);
    }
    if (c.ended) {
      for (const track of [c.mic, c.camera, c.screen]) track?.stop(); // hung up while asking
      return;
    }
    await connect(c, config.ice_servers);
  } catch (err) {
    finish(c, err instanceof CallError ? err.message : `The call failed: ${err.message || err}`);
  }
}

async function connect(c, iceServers) {
  const pc = (c.pc = new RTCPeerConnection({ iceServers }));
  pc.addTrack(c.mic, new MediaStream([c.mic]));
  // always one video sender: camera and screen take turns on it without renegotiating
  c.videoSender = pc.addTransceiver("video", { direction: "sendonly" }).sender;
  await showVideo(c, c.screen || c.camera);
  c.dc = pc.createDataChannel("oai-events");
  // the voice, and the caller's words back as text (conversation.item.input_audio_transcription.*)
  c.dc.onopen = () => sendVoice(c, { input: { transcription: { model: "whisper-1" } } });
  c.dc.onmessage = (e) => onEvent(c, JSON.parse(e.data));
  c.dc.onclose = () => finish(c, `The call ended: ${c.lastError || "the server hung up."}`);
  pc.ontrack = (e) => hearAssistant(c, e.streams[0] || new MediaStream([e.track]));
  pc.onconnectionstatechange = () => onConnectionState(c);

  setState("connecting", "Connecting…");
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc); // the server takes no trickled candidates: send them all at once
  let response;
  try {
    response = await fetch(CALLS, {
      method: "POST",
      body: pc.localDescription.sdp,
      headers: { ...auth(), "Content-Type": "application/sdp" },
    });
  } catch {
    throw new CallError("Can't reach the server. Is it running?");
  }
  if (!response.ok) throw new CallError(await refusal(response));
  c.location = response.headers.get("Location");
  const answer = await response.text();
  if (c.ended) return hangUpOnServer(c);
  await pc.setRemoteDescription({ type: "answer", sdp: answer });
  c.timer = setInterval(() => tick(c), TICK_MS);
}

function hangUp() {
  if (!call) return;
  const c = call;
  finish(c, null);
  hangUpOnServer(c);
}

function hangUpOnServer(c) {
  if (c.location) {
    fetch(c.location, { method: "DELETE", headers: auth(), keepalive: true }).catch(() => {});
  }
}

// Ends the call here (idempotent); `message` says why when it was not the caller's choice.
function finish(c, message) {
  if (c.ended) return;
  c.ended = true;
  if (call === c) call = null;
  clearInterval(c.timer);
  if (c.dc) c.dc.onclose = null;
  c.dc?.close();
  c.pc?.close();
  for (const track of [c.mic, c.camera, c.screen]) track?.stop();
  c.audio.close();
  $("remote-audio").srcObject = null;
  $("preview").srcObject = null;
  $("preview-off").hidden = false;
  setSpeaking(false);
  setMuted(false);
  setInCall(false);
  setState(message ? "failed" : "idle", message ? "Call ended" : "Not connected");
  if (message) showAlert(message);
}

function onConnectionState(c) {
  switch (c.pc.connectionState) {
    case "connected":
      c.connected = true;
      setState("connected", "Connected");
      break;
    case "disconnected":
      setState("reconnecting", "Connection unstable, reconnecting…");
      break;
    case "failed":
      finish(c, c.connected
        ? "The connection was lost. Check your network and call again."
        : "Couldn't connect the call's media: the network between you and the server blocks " +
          "it (the server may need a TURN server).");
      break;
    case "closed":
      finish(c, `The call ended: ${c.lastError || "the connection closed."}`);
      break;
  }
}

function gathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") resolve();
    });
    setTimeout(resolve, GATHER_TIMEOUT_MS);
  });
}

async function fetchConfig() {
  let response;
  try {
    response = await fetch(`${CALLS}/config`, { headers: auth() });
  } catch {
    throw new CallError("Can't reach the server. Is it running?");
  }
  if (!response.ok) throw new CallError(await refusal(response));
  return response.json();
}

async function refusal(response) {
  let reason = `HTTP ${response.status}`;
  try {
    reason = (await response.json()).error?.message || reason;
  } catch {}
  if (response.status === 401) {
    $("settings").open = true;
    $("api-key").focus();
    return `This server needs an API key: enter it under Server settings and call again. (${reason})`;
  }
  if (response.status === 503) return `The server can't take a call right now: ${reason}`;
  return `The server refused the call: ${reason}`;
}

function auth() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// -- your microphone, camera and screen

async function openMic() {
  if (!navigator.mediaDevices) {
    throw new CallError("This page needs a secure address (https, or localhost) to use the microphone.");
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    return stream.getAudioTracks()[0];
  } catch (err) {
    throw new CallError(deviceProblem(err, "microphone"));
  }
}

async function openCamera() {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15 } },
    });
    return stream.getVideoTracks()[0];
  } catch (err) {
    throw new CallError(deviceProblem(err, "camera"));
  }
}

async function openScreen() {
  try {
    const stream = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: VIDEO_FPS } });
    return stream.getVideoTracks()[0];
  } catch (err) {
    throw new CallError(err.name === "NotAllowedError"
      ? "Screen sharing was cancelled or not allowed."
      : `The screen could not be shared (${err.message || err.name}).`);
  }
}

// Video is optional: without it the call goes on with voice only, and says so.
async function openOptional(open) {
  try {
    return await open();
  } catch (err) {
    showAlert(`${err.message} The call continues with voice only.`, "warning");
    return null;
  }
}

function deviceProblem(err, device) {
  switch (err?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return `Access to the ${device} was denied. Allow it in the browser's site settings, then call again.`;
    case "NotFoundError":
    case "OverconstrainedError":
      return `No ${device} was found.`;
    case "NotReadableError":
    case "AbortError":
      return `The ${device} is in use by another app or could not be started.`;
    default:
      return `The ${device} could not be opened (${err?.message || err}).`;
  }
}

async function showVideo(c, track) {
  $("preview").srcObject = track ? new MediaStream([track]) : null;
  $("preview-off").hidden = Boolean(track);
  $("preview-off").textContent = c.kind === "video" ? "Camera off" : "No video";
  await c.videoSender.replaceTrack(track);
  if (!track) return;
  // send no more than the model looks at: its frame size, a few frames per second
  const params = c.videoSender.getParameters();
  if (!params.encodings?.length) params.encodings = [{}];
  const { width = 0, height = 0 } = track.getSettings();
  params.encodings[0].scaleResolutionDownBy = Math.max(1, Math.max(width, height) / c.maxSide);
  params.encodings[0].maxFramerate = VIDEO_FPS;
  await c.videoSender.setParameters(params).catch(() => {}); // a hint; fine if refused
}

async function toggleScreen() {
  if (!call) return startCall("screen");
  const c = call;
  if (c.screen) return stopScreen(c);
  let screen;
  try {
    screen = await openScreen();
  } catch (err) {
    return showAlert(err.message, "warning");
  }
  if (c.ended) return screen.stop();
  c.screen = screen;
  screen.addEventListener("ended", () => stopScreen(c));
  await showVideo(c, screen);
  setSharing(true);
}

async function stopScreen(c) {
  c.screen?.stop();
  c.screen = null;
  setSharing(false);
  if (!c.ended) await showVideo(c, c.camera);
}

function toggleMute() {
  if (!call?.mic) return;
  call.mic.enabled = !call.mic.enabled; // a muted track still sends (silence): the call stays up
  setMuted(!call.mic.enabled);
}

// -- the assistant's voice, levels and turn timing

function hearAssistant(c, stream) {
  if (c.ended) return;
  const element = $("remote-audio");
  element.srcObject = stream; // Chrome plays remote audio only through a media element
  element.play().catch(() => showAlert("Click the page to hear the assistant.", "warning"));
  c.remote = analyser(c.audio, stream);
}

function analyser(context, stream) {
  const node = context.createAnalyser();
  node.fftSize = 1024;
  context.createMediaStreamSource(stream).connect(node);
  return { node, samples: new Float32Array(node.fftSize) };
}

function level(meter) {
  if (!meter) return 0;
  meter.node.getFloatTimeDomainData(meter.samples);
  let sum = 0;
  for (const x of meter.samples) sum += x * x;
  return Math.sqrt(sum / meter.samples.length);
}

function tick(c) {
  const now = performance.now();
  const mine = level(c.local);
  const theirs = level(c.remote);
  if (mine > LOUD) c.lastLoudAt = now;
  stats.remotePeak = Math.max(stats.remotePeak, theirs);
  $("your-level").value = Math.min(1, mine * 5);
  $("assistant-level").value = Math.min(1, theirs * 5);
  $("assistant-pulse").style.setProperty("--level", Math.min(1, theirs * 8).toFixed(2));
  if (c.turnEnd !== null && theirs > LOUD) {
    recordLatency(c, now - c.turnEnd);
    c.turnEnd = null;
  }
}

// The end of your speech: the microphone's last loud moment, if it fits what the server's
// voice detector saw; else the detector's decision less the silence it waits for.
function speechEnded(c) {
  const decided = performance.now() - c.silenceMs;
  return c.lastLoudAt > decided - 1000 ? Math.min(c.lastLoudAt, performance.now()) : decided;
}

function recordLatency(c, ms) {
  stats.latencies.push(ms);
  const item = document.createElement("li");
  item.textContent = `Turn ${stats.latencies.length}: ${Math.round(ms)} ms`;
  $("latencies").append(item);
  if (c.reply) c.reply.time.textContent = `${Math.round(ms)} ms`;
}

// -- events from the server

function onEvent(c, event) {
  stats.events.push(event.type);
  switch (event.type) {
    case "session.created":
    case "session.updated": {
      const s = event.session;
      const vad = s.audio?.input?.turn_detection ?? s.turn_detection;
      if (vad?.silence_duration_ms) c.silenceMs = vad.silence_duration_ms;
      break;
    }
    case "input_audio_buffer.speech_started":
      c.turnEnd = null;
      c.you = addLine("you", "You", "speaking…");
      c.you.startMs = event.audio_start_ms;
      c.yours.set(event.item_id, c.you);
      break;
    case "input_audio_buffer.speech_stopped":
      c.turnEnd = speechEnded(c);
      if (c.you) {
        const seconds = (event.audio_end_ms - c.you.startMs) / 1000;
        c.you.text.textContent = `spoke for ${seconds.toFixed(1)} s`;
      }
      break;
    case "conversation.item.input_audio_transcription.delta": {
      // your words replace "spoke for N s" as they come; no words keep the duration
      const line = c.yours.get(event.item_id);
      if (line && event.delta) {
        if (!line.words) line.text.textContent = "";
        line.words = true;
        line.text.textContent += event.delta;
      }
      break;
    }
    case "conversation.item.input_audio_transcription.completed": {
      const line = c.yours.get(event.item_id);
      if (line && event.transcript) line.text.textContent = event.transcript;
      c.yours.delete(event.item_id);
      break;
    }
    case "conversation.item.input_audio_transcription.failed":
      c.yours.delete(event.item_id);
      break;
    case "response.created":
      c.reply = addLine("assistant", "Assistant", "");
      break;
    case "response.output_item.added":
      if (c.reply) c.replies.set(event.item.id, c.reply);
      break;
    case "response.output_audio_transcript.delta":
    case "response.audio_transcript.delta":
    case "response.output_text.delta":
    case "response.text.delta":
      if (c.reply) c.reply.text.textContent += event.delta;
      break;
    case "response.done": {
      const content = event.response.output?.[0]?.content?.[0];
      if (c.reply && content) c.reply.text.textContent = content.transcript ?? content.text ?? "";
      if (c.reply && event.response.status === "cancelled") c.reply.li.classList.add("interrupted");
      if (c.reply && event.response.status === "failed") {
        c.reply.li.classList.add("failed");
        showAlert(event.response.status_details?.error?.message || "The reply failed.", "warning");
      }
      break;
    }
    case "conversation.item.truncated":
      // the server kept only what you heard: show that
      c.replies.get(event.item_id)?.li.classList.add("interrupted");
      send(c, { type: "conversation.item.retrieve", item_id: event.item_id });
      break;
    case "conversation.item.retrieved": {
      const line = c.replies.get(event.item.id);
      const content = event.item.content?.[0];
      if (line && content) line.text.textContent = content.transcript ?? content.text ?? "";
      break;
    }
    case "output_audio_buffer.started":
      setSpeaking(true);
      break;
    case "output_audio_buffer.stopped":
    case "output_audio_buffer.cleared":
      setSpeaking(false);
      break;
    case "error":
      c.lastError = event.error.message;
      showAlert(`The server says: ${event.error.message}`, "warning");
      break;
  }
}

function send(c, event) {
  if (c.dc?.readyState === "open") c.dc.send(JSON.stringify(event));
}

function sendVoice(c, audio = {}) {
  const voice = $("voice").value;
  send(c, { type: "session.update", session: { type: "realtime", audio: { ...audio, output: { voice } } } });
}

// -- the page

function addLine(who, label, text) {
  $("transcript-empty").hidden = true;
  const li = document.createElement("li");
  li.className = who;
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = label;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  const time = document.createElement("span");
  time.className = "time";
  li.append(name, body, time);
  $("transcript").append(li);
  li.scrollIntoView({ block: "nearest" });
  return { li, text: body, time };
}

function fillVoices(voices) {
  const select = $("voice");
  const current = select.value;
  select.replaceChildren(...voices.map((v) => new Option(v, v, false, v === current)));
}

function setState(state, text) {
  const el = $("state");
  el.dataset.state = state;
  el.textContent = text;
}

function setInCall(active) {
  $("video-call").disabled = active;
  $("voice-call").disabled = active;
  $("mute").disabled = !active;
  $("hang-up").disabled = !active;
  if (!active) setSharing(false);
  document.body.classList.toggle("in-call", active);
}

function setMuted(muted) {
  $("mute").setAttribute("aria-pressed", String(muted));
  $("mute").textContent = muted ? "Unmute" : "Mute";
  $("muted-badge").hidden = !muted;
}

function setSharing(sharing) {
  $("share-screen").setAttribute("aria-pressed", String(sharing));
  $("share-screen").textContent = sharing ? "Stop sharing" : "Share screen";
}

function setSpeaking(speaking) {
  $("speaking-badge").hidden = !speaking;
  document.body.classList.toggle("assistant-speaking", speaking);
}

function showAlert(message, kind = "error") {
  const el = $("alert");
  el.textContent = message;
  el.dataset.kind = kind;
  el.hidden = false;
}

function clearAlert() {
  $("alert").hidden = true;
  $("alert").textContent = "";
}

$("video-call").addEventListener("click", () => startCall("video"));
$("voice-call").addEventListener("click", () => startCall("voice"));
$("share-screen").addEventListener("click", toggleScreen);
$("mute").addEventListener("click", toggleMute);
$("hang-up").addEventListener("click", hangUp);
$("voice").addEventListener("change", () => {
  localStorage.setItem("omni.voice", $("voice").value);
  if (call) sendVoice(call);
});
$("api-key").addEventListener("change", () => localStorage.setItem("omni.apiKey", $("api-key").value));
document.addEventListener("keydown", (e) => {
  const typing = e.target.closest?.("input, select, textarea");
  if (e.key.toLowerCase() === "m" && call && !typing && !e.ctrlKey && !e.metaKey && !e.altKey) {
    toggleMute();
  }
});
window.addEventListener("pagehide", hangUp);
$("api-key").value = localStorage.getItem("omni.apiKey") || "";
$("voice").value = localStorage.getItem("omni.voice") || $("voice").value;
