// An @discordjs/voice 0.19.2 client for fastsfu's interop tests (docs/testing.md#other-real-peers).
//
//   node tests/discord/djs_client.mjs --json-args -              (arguments: one JSON object on stdin)
//   node tests/discord/djs_client.mjs --json-args '{"endpoint": "127.0.0.1:PORT", ...}'
//   node tests/discord/djs_client.mjs --json-args @args.json
//
// Joins through a fake adapter (VOICE_STATE_UPDATE, then VOICE_SERVER_UPDATE, asynchronously;
// daveEncryption: false so IDENTIFY carries max_dave_protocol_version 0), waits for Ready, subscribes
// the receiver to each `receive_from` user (EndBehaviorType.Manual) and records every decrypted Opus
// payload with the user it was attributed to, plays `frames` (pre-encoded Opus, base64) through an
// AudioPlayer (StreamType.Opus) or through prepareAudioPacket/dispatchAudio, and records the
// VoiceConnection and Networking state transitions, WebSocket close codes, resumes and rejoins.
// wss: the CA comes from NODE_EXTRA_CA_CERTS (set by tests/discord_clients.py).
//
// stdout: progress events {"event": "ready" | "played" | "resumed" | "ws_close" | "status" |
// "received", ...} and finally one {"result": {...}} line (fields: DjsResult in
// tests/discord_clients.py); debug output goes to stderr. Exit code 0 if ok, 1 if not, 2 for bad
// arguments. Every wait is bounded; `hard_deadline_ms` ends the process whatever happens.

import { readFileSync, readSync } from 'node:fs';
import { Readable } from 'node:stream';
import {
  AudioPlayerStatus,
  EndBehaviorType,
  NetworkingStatusCode,
  NoSubscriberBehavior,
  StreamType,
  VoiceConnectionStatus,
  createAudioPlayer,
  createAudioResource,
  entersState,
  generateDependencyReport,
  joinVoiceChannel,
} from '@discordjs/voice';

const T0 = performance.now();
const now = () => Math.round(performance.now() - T0);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const SILENCE = Buffer.from([0xf8, 0xff, 0xfe]);
const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

// All of stdin: readFileSync(0) fails with EAGAIN when the harness's (non-blocking) socket has
// no data yet or only part of a large argument object, so read until EOF, waiting briefly on EAGAIN.
function readStdin() {
  const chunks = [];
  const buf = Buffer.alloc(65536);
  const pause = new Int32Array(new SharedArrayBuffer(4));
  for (let waited = 0; waited < 20000; ) {
    let n;
    try {
      n = readSync(0, buf, 0, buf.length, null);
    } catch (err) {
      if (err.code !== 'EAGAIN') throw err;
      Atomics.wait(pause, 0, 0, 5);
      waited += 5;
      continue;
    }
    if (n === 0) return Buffer.concat(chunks).toString('utf8');
    chunks.push(Buffer.from(buf.subarray(0, n)));
  }
  throw new Error('no end of the arguments on stdin within 20 s');
}

function loadArgs(argv) {
  const i = argv.indexOf('--json-args');
  if (i < 0 || i + 1 >= argv.length) throw new Error('usage: djs_client.mjs --json-args JSON|@file|-');
  const spec = argv[i + 1];
  const text = spec === '-' ? readStdin() : spec.startsWith('@') ? readFileSync(spec.slice(1), 'utf8') : spec;
  const args = JSON.parse(text);
  if (args === null || typeof args !== 'object' || Array.isArray(args)) throw new Error('--json-args must be a JSON object');
  if (args.frames_file) args.frames = JSON.parse(readFileSync(args.frames_file, 'utf8'));
  for (const key of ['endpoint', 'guild_id', 'channel_id', 'user_id', 'session_id', 'token']) {
    if (args[key] === undefined || args[key] === null) throw new Error(`missing argument ${key}`);
  }
  return args;
}

let args;
try {
  args = loadArgs(process.argv);
} catch (err) {
  emit({ result: { ok: false, errors: [`bad arguments: ${err}`] } });
  process.exit(2);
}

const GUILD = String(args.guild_id);
const CHANNEL = String(args.channel_id);
const ME = String(args.user_id);
const frames = (args.frames ?? []).map((f) => Buffer.from(f, 'base64'));
const receiveFrom = (args.receive_from ?? []).map(String);
const expectFrames = Object.fromEntries(Object.entries(args.expect_frames ?? {}).map(([k, v]) => [String(k), Number(v)]));
const durationMs = Number(args.duration_ms ?? 10_000);
const readyTimeoutMs = Number(args.ready_timeout_ms ?? 10_000);
const hardDeadlineMs = Number(args.hard_deadline_ms ?? durationMs + readyTimeoutMs + 5_000);
const maxRtpRecords = Number(args.max_rtp_records ?? 5000);
const debug = Boolean(args.debug);
const networkingNames = Object.fromEntries(
  Object.entries(NetworkingStatusCode).filter(([, v]) => typeof v === 'number').map(([k, v]) => [v, k]),
);

const result = {
  ok: false,
  ready: false,
  mode: null,
  ssrc: null,
  ready_payload: null,
  session_description: null,
  received: Object.fromEntries(receiveFrom.map((u) => [u, []])),
  received_rtp: [],
  rtp_records_dropped: 0,
  speaking: [],
  ws_ops_received: [],
  states: [],
  networking_states: [],
  ws_close_codes: [],
  networking_close_codes: [],
  resumes: 0,
  resumed_op9: 0,
  rejoin_requests: 0,
  packets_sent: 0,
  silence_sent: 0,
  frames_sent: 0,
  frames_skipped: 0,
  played: false,
  final_status: null,
  disconnect_reason: null,
  close_code: null,
  errors: [],
  stream_errors: [],
  dependency_report: '',
  versions: { node: process.version },
};
try {
  result.dependency_report = generateDependencyReport();
} catch (err) {
  result.dependency_report = `generateDependencyReport failed: ${err}`;
}

let finished = false;
function finish(code) {
  if (finished) return;
  finished = true;
  clearTimeout(hardDeadline);
  if (result.final_status === null) snapshotStatus();
  process.stdout.write(`${JSON.stringify({ result })}\n`, () => process.exit(code));
  setTimeout(() => process.exit(code), 2000).unref();
}
function snapshotStatus() {
  result.final_status = conn?.state?.status ?? null;
  result.disconnect_reason = conn?.state?.reason ?? null;
  result.close_code = conn?.state?.closeCode ?? null;
}
const fail = (where, err) => {
  result.errors.push(`${where}: ${err?.stack ?? err}`);
};
// Referenced on purpose: the process lives until this fires at the latest, and never ends silently.
const hardDeadline = setTimeout(() => {
  fail('hard deadline', `${hardDeadlineMs} ms`);
  result.ok = false;
  finish(1);
}, hardDeadlineMs);
process.on('beforeExit', () => {
  if (finished) return;
  fail('event loop drained', 'no pending work before a result');
  result.ok = false;
  finish(1);
});
process.on('uncaughtException', (err) => {
  fail('uncaughtException', err);
  result.ok = false;
  finish(1);
});
process.on('unhandledRejection', (err) => fail('unhandledRejection', err));

// The fake adapter: answer asynchronously, state update before server update (the
// endpoint starts networking). Leave payloads (channel_id null) get a state update only.
let joins = 0;
const adapterCreator = (methods) => ({
  sendPayload(payload) {
    const channelId = payload?.d?.channel_id ?? null;
    if (channelId !== null) {
      joins += 1;
      if (joins > 1) {
        result.rejoin_requests += 1;
        if (result.rejoin_requests > Number(args.max_rejoins ?? 0)) return false;
      }
    }
    setImmediate(() => {
      methods.onVoiceStateUpdate({
        guild_id: GUILD,
        channel_id: channelId,
        user_id: ME,
        session_id: String(args.session_id),
        deaf: false,
        mute: false,
        self_deaf: false,
        self_mute: false,
        suppress: false,
        self_video: false,
        request_to_speak_timestamp: null,
      });
      if (channelId !== null) {
        methods.onVoiceServerUpdate({ guild_id: GUILD, token: String(args.token), endpoint: String(args.endpoint) });
      }
    });
    return true;
  },
  destroy() {},
});

let conn;
try {
  conn = joinVoiceChannel({
    guildId: GUILD,
    channelId: CHANNEL,
    adapterCreator,
    selfDeaf: false,
    selfMute: false,
    daveEncryption: false,
    debug,
  });
} catch (err) {
  fail('joinVoiceChannel', err);
  finish(1);
}

// Recording hooks. The receiver's handlers are bound functions that the connection attaches to each
// new WebSocket/UDP socket (updateReceiveBindings), so wrapping them before networking starts (the
// adapter answers on setImmediate) sees every message the receiver sees.
const receiver = conn.receiver;
const origWsPacket = receiver.onWsPacket;
receiver.onWsPacket = (packet) => {
  result.ws_ops_received.push(packet.op);
  if (packet.op === 2) {
    result.ready_payload = packet.d;
    result.ssrc = packet.d?.ssrc ?? null;
  } else if (packet.op === 4) {
    const { secret_key: key, ...rest } = packet.d ?? {};
    result.session_description = { ...rest, secret_key_len: Array.isArray(key) ? key.length : null };
    result.mode = rest.mode ?? null;
  } else if (packet.op === 5) {
    result.speaking.push({ ...packet.d, t: now() });
  } else if (packet.op === 9) {
    result.resumed_op9 += 1;
  }
  return origWsPacket(packet);
};
const origUdpMessage = receiver.onUdpMessage;
receiver.onUdpMessage = (msg) => {
  if (msg.length >= 12 && msg[0] >> 6 === 2) {
    if (result.received_rtp.length < maxRtpRecords) {
      result.received_rtp.push({
        ssrc: msg.readUInt32BE(8),
        seq: msg.readUInt16BE(2),
        ts: msg.readUInt32BE(4),
        pt: msg[1] & 0x7f,
        marker: Boolean(msg[1] & 0x80),
        cc: msg[0] & 0x0f,
        x: Boolean(msg[0] & 0x10),
        len: msg.length,
        t: now(),
      });
    } else {
      result.rtp_records_dropped += 1;
    }
  }
  return origUdpMessage(msg);
};
// Count what actually left: a prepared packet is lost if the connection is not Ready at dispatch.
let preparedSilence = false;
const origPrepare = conn.prepareAudioPacket.bind(conn);
conn.prepareAudioPacket = (buffer) => {
  const packet = origPrepare(buffer);
  if (packet !== undefined) preparedSilence = buffer.equals(SILENCE);
  return packet;
};
const origDispatch = conn.dispatchAudio.bind(conn);
conn.dispatchAudio = () => {
  const sent = origDispatch();
  if (sent) {
    result.packets_sent += 1;
    if (preparedSilence) result.silence_sent += 1;
    else result.frames_sent += 1;
  }
  return sent;
};

const seenNetworking = new WeakSet();
const seenWs = new WeakSet();
function watchWs(ws) {
  if (!ws || seenWs.has(ws)) return;
  seenWs.add(ws);
  ws.on('close', (event) => {
    result.ws_close_codes.push(event.code);
    emit({ event: 'ws_close', t: now(), code: event.code });
  });
}
function watchNetworking(networking) {
  if (!networking || seenNetworking.has(networking)) return;
  seenNetworking.add(networking);
  watchWs(networking.state.ws);
  networking.on('stateChange', (oldState, newState) => {
    watchWs(newState.ws);
    if (oldState.code === newState.code) return;
    result.networking_states.push({ t: now(), code: newState.code, name: networkingNames[newState.code] });
    if (oldState.code === NetworkingStatusCode.Resuming && newState.code === NetworkingStatusCode.Ready) {
      result.resumes += 1;
      emit({ event: 'resumed', t: now(), resumes: result.resumes });
    }
  });
  networking.on('close', (code) => result.networking_close_codes.push(code));
}
result.states.push({ t: now(), status: conn.state.status });
conn.on('stateChange', (oldState, newState) => {
  watchNetworking(newState.networking);
  if (oldState.status === newState.status) return;
  const entry = { t: now(), status: newState.status };
  if (newState.reason !== undefined) entry.reason = newState.reason;
  if (newState.closeCode !== undefined) entry.close_code = newState.closeCode;
  result.states.push(entry);
  emit({ event: 'status', ...entry });
});
conn.on('error', (err) => fail('connection error', err));
if (debug) conn.on('debug', (m) => process.stderr.write(`[djs] ${m}\n`));

function expectationsMet() {
  if (frames.length > 0 && !result.played) return false;
  if (args.expect_resume && result.resumes < 1) return false;
  for (const [user, count] of Object.entries(expectFrames)) {
    if ((result.received[user]?.length ?? 0) < count) return false;
  }
  return true;
}
const hasExpectations = () => frames.length > 0 || Boolean(args.expect_resume) || Object.keys(expectFrames).length > 0;
// Disconnected is terminal without help (4014, adapter unavailable, endpoint removed): djs goes
// back to Signalling, not Disconnected, when it rejoins by itself.
const gone = () =>
  conn.state.status === VoiceConnectionStatus.Destroyed || conn.state.status === VoiceConnectionStatus.Disconnected;

async function playFrames() {
  if (args.send_via === 'networking') {
    const interval = Number(args.frame_interval_ms ?? 20);
    const start = performance.now();
    for (let i = 0; i < frames.length; i++) {
      if (conn.prepareAudioPacket(frames[i]) !== undefined) conn.dispatchAudio();
      else result.frames_skipped += 1;
      const wait = start + (i + 1) * interval - performance.now();
      if (wait > 0) await sleep(wait);
    }
    if (conn.state.status === VoiceConnectionStatus.Ready) conn.setSpeaking(false);
  } else {
    const player = createAudioPlayer({ behaviors: { noSubscriber: NoSubscriberBehavior.Pause } });
    player.on('error', (err) => fail('player error', err));
    conn.subscribe(player);
    const resource = createAudioResource(Readable.from(frames), {
      inputType: StreamType.Opus,
      silencePaddingFrames: Number(args.silence_padding_frames ?? 5),
    });
    player.play(resource);
    const budget = frames.length * 20 + 5_000 + durationMs;
    try {
      // play() has left Idle synchronously (Buffering), so this waits for the end of the resource
      await entersState(player, AudioPlayerStatus.Idle, budget);
    } catch (err) {
      fail('player', err);
    }
    player.stop(true);
  }
  result.played = true;
  emit({ event: 'played', t: now(), frames_sent: result.frames_sent, packets_sent: result.packets_sent });
}

async function main() {
  try {
    await entersState(conn, VoiceConnectionStatus.Ready, readyTimeoutMs);
  } catch (err) {
    fail('ready', err);
    return;
  }
  result.ready = true;
  emit({ event: 'ready', t: now(), ssrc: result.ssrc, mode: result.mode });

  for (const user of receiveFrom) {
    const stream = conn.receiver.subscribe(user, { end: { behavior: EndBehaviorType.Manual } });
    stream.on('data', (opus) => {
      const list = result.received[user];
      list.push(opus.toString('base64'));
      if (expectFrames[user] !== undefined && list.length === expectFrames[user]) {
        emit({ event: 'received', t: now(), user_id: user, count: list.length });
      }
    });
    stream.on('error', (err) => result.stream_errors.push(`${user}: ${err}`));
  }

  const deadline = durationMs;
  let playing = null;
  if (frames.length > 0) {
    playing = (async () => {
      // djs sends op 5 speaking 1 just before its first packet; the server relays it over TLS
      // while it forwards the RTP at once, so receivers may drop the first packet(s) for want
      // of the SSRC mapping. Announcing early (default 200 ms) avoids that race.
      const announceMs = Number(args.announce_speaking_ms ?? 0);
      if (announceMs > 0 && conn.state.status === VoiceConnectionStatus.Ready) {
        conn.setSpeaking(true);
        await sleep(announceMs);
      }
      if (args.play_delay_ms) await sleep(Number(args.play_delay_ms));
      await playFrames();
    })().catch((err) => fail('play', err));
  }
  while (now() < deadline) {
    if (hasExpectations() && expectationsMet()) break;
    if (args.exit_on_disconnect !== false && gone()) break;
    await sleep(20);
  }
  if (now() >= deadline && hasExpectations() && !expectationsMet()) {
    fail('expectations', `not met within duration_ms=${durationMs}`);
  }
  if (playing !== null) await Promise.race([playing, sleep(1_000)]);
  await sleep(Number(args.linger_ms ?? 200));
}

main()
  .catch((err) => fail('main', err))
  .finally(async () => {
    result.ok =
      result.ready &&
      result.errors.length === 0 &&
      result.stream_errors.length === 0 &&
      (frames.length === 0 || result.played) &&
      (!args.expect_resume || result.resumes >= 1) &&
      Object.entries(expectFrames).every(([u, c]) => (result.received[u]?.length ?? 0) >= c);
    snapshotStatus(); // before our own destroy(): what the server did to the connection
    try {
      if (conn.state.status !== VoiceConnectionStatus.Destroyed) {
        // mono: CLOCK_MONOTONIC seconds (libuv's hrtime), comparable with Python's time.monotonic()
        emit({ event: 'leaving', t: now(), mono: Number(process.hrtime.bigint()) / 1e9 });
        conn.destroy();
      }
    } catch (err) {
      fail('destroy', err);
    }
    await sleep(50); // lets the leave payload and the WebSocket close go out
    finish(result.ok ? 0 : 1);
  });
