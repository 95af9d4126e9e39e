// The /demo page served by fastsfu: join a Harmony voice channel from a browser over hRPC.
// Settings come from the form, or from the URL (?guild=&channel=&autojoin=1, #token=...; the
// token goes in the fragment so it never reaches an HTTP log). window.fastsfuDemo exposes the
// state and getStats() figures to the automated browser test.
import { type Peer, VoiceConnection } from "./voice-client";

interface PeerStats {
  userId: string;
  packetsReceived: number;
  totalSamplesReceived: number;
  totalAudioEnergy: number;
  audioLevel: number;
  ssrcAudioLevel: number | null;
}

interface DemoState {
  state: "idle" | "joining" | "joined" | "closed" | "error";
  error: string | null;
  log: string[];
  speaking: string[]; // user IDs the server measures as speaking now (GET /demo/speaking)
  join: () => Promise<void>;
  leave: () => Promise<void>;
  peers: () => string[];
  stats: () => Promise<{ packetsSent: number; peers: PeerStats[] }>;
  paths: () => Promise<string[]>;
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const query = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.slice(1));
const tokenInput = $<HTMLInputElement>("token");
const guildInput = $<HTMLInputElement>("guild");
const channelInput = $<HTMLInputElement>("channel");
const joinButton = $<HTMLButtonElement>("join");
const leaveButton = $<HTMLButtonElement>("leave");
const statusEl = $("status");
const peersEl = $("peers");
const logEl = $("log");
tokenInput.value = fragment.get("token") || query.get("token") || "";
guildInput.value = query.get("guild") || "1";
channelInput.value = query.get("channel") || "1";

let connection: VoiceConnection | null = null;
let localStream: MediaStream | null = null;
const meters = new Map<string, { row: HTMLElement; meter: HTMLMeterElement; audio: HTMLAudioElement }>();

const demo: DemoState = {
  state: "idle",
  error: null,
  log: [],
  speaking: [],
  join,
  leave,
  peers: () => [...(connection?.peers.keys() ?? [])],
  stats,
  paths,
};
(window as unknown as { fastsfuDemo: DemoState }).fastsfuDemo = demo;

function log(line: string): void {
  demo.log.push(line);
  logEl.textContent += `${new Date().toISOString().slice(11, 23)} ${line}\n`;
  console.log(`[demo] ${line}`);
}

function setState(state: DemoState["state"], detail = ""): void {
  demo.state = state;
  statusEl.textContent = detail ? `${state}: ${detail}` : state;
  joinButton.disabled = state === "joining" || state === "joined";
  leaveButton.disabled = state !== "joining" && state !== "joined";
}

function showPeer(peer: Peer): void {
  hidePeer(peer.userId);
  const row = document.createElement("li");
  const meter = document.createElement("meter");
  meter.min = 0;
  meter.max = 1;
  const audio = new Audio();
  audio.srcObject = new MediaStream([peer.consumer.track]);
  audio.play().catch((e) => log(`audio.play: ${e}`));
  row.append(`user ${peer.userId} `, meter);
  peersEl.append(row);
  meters.set(peer.userId, { row, meter, audio });
}

function hidePeer(userId: string): void {
  const m = meters.get(userId);
  if (!m) return;
  m.audio.srcObject = null;
  m.row.remove();
  meters.delete(userId);
}

async function join(): Promise<void> {
  if (connection && !connection.closed) return;
  setState("joining");
  try {
    localStream = await navigator.mediaDevices.getUserMedia({ audio: true });
    connection = new VoiceConnection(location.origin, tokenInput.value.trim(), {
      onLog: log,
      onPeerJoined: showPeer,
      onPeerLeft: hidePeer,
      onClosed: (error) => {
        for (const userId of [...meters.keys()]) hidePeer(userId);
        localStream?.getTracks().forEach((t) => t.stop());
        if (error) {
          demo.error = `${error.code}: ${error.message}`;
          setState("error", demo.error);
        } else {
          setState("closed");
        }
      },
    });
    await connection.join(guildInput.value.trim(), channelInput.value.trim(), localStream.getAudioTracks()[0]);
    if (!connection.closed) setState("joined", `guild ${guildInput.value}, channel ${channelInput.value}`);
  } catch (e) {
    demo.error = connection?.error ? `${connection.error.code}: ${connection.error.message}` : String(e);
    log(`join failed: ${demo.error}`);
    await connection?.leave();
    setState("error", demo.error);
  }
}

async function leave(): Promise<void> {
  await connection?.leave();
}

async function stats(): Promise<{ packetsSent: number; peers: PeerStats[] }> {
  let packetsSent = 0;
  if (connection?.producer) {
    (await connection.producer.getStats()).forEach((s) => {
      if (s.type === "outbound-rtp") packetsSent = s.packetsSent;
    });
  }
  const peers: PeerStats[] = [];
  for (const peer of connection?.peers.values() ?? []) {
    const out: PeerStats = {
      userId: peer.userId,
      packetsReceived: 0,
      totalSamplesReceived: 0,
      totalAudioEnergy: 0,
      audioLevel: 0,
      ssrcAudioLevel: null,
    };
    (await peer.consumer.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp") {
        out.packetsReceived = s.packetsReceived;
        out.totalSamplesReceived = s.totalSamplesReceived;
        out.totalAudioEnergy = s.totalAudioEnergy;
        out.audioLevel = s.audioLevel;
      }
    });
    const sources = peer.consumer.rtpReceiver?.getSynchronizationSources() ?? [];
    out.ssrcAudioLevel = sources.length ? (sources[0].audioLevel ?? null) : null;
    peers.push(out);
  }
  return { packetsSent, peers };
}

// The protocol ("udp" or "tcp") of the send and the receive transport's selected ICE candidate
// pair, from getStats (the ICE-TCP browser test; docs/transports.md, "ICE over TCP").
async function paths(): Promise<string[]> {
  const out: string[] = [];
  for (const transport of [connection?.sendTransport, connection?.recvTransport]) {
    if (!transport) continue;
    const report = await transport.getStats();
    let pairId: string | undefined;
    report.forEach((s) => {
      if (s.type === "transport" && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
    });
    const pair = pairId ? report.get(pairId) : undefined;
    const local = pair ? report.get(pair.localCandidateId) : undefined;
    out.push(local ? String(local.protocol) : "none");
  }
  return out;
}

// Level meters from the audio-level header extension the SFU forwards (RFC 6464).
setInterval(() => {
  for (const peer of connection?.peers.values() ?? []) {
    const sources = peer.consumer.rtpReceiver?.getSynchronizationSources() ?? [];
    const m = meters.get(peer.userId);
    if (m) m.meter.value = sources.length ? (sources[0].audioLevel ?? 0) : 0;
  }
}, 200);

// Who is speaking: protocol.voice.v1 has no speaking message, so the page asks the server, which
// measures it from every member's audio levels (docs/observers.md#speaking).
let speakingBusy = false;
setInterval(async () => {
  if (demo.state !== "joined" || speakingBusy) return;
  speakingBusy = true;
  try {
    const url = `/demo/speaking?guild=${encodeURIComponent(guildInput.value.trim())}&channel=${encodeURIComponent(channelInput.value.trim())}`;
    const response = await fetch(url, { headers: { Authorization: `Bearer ${tokenInput.value.trim()}` } });
    if (response.ok) {
      demo.speaking = ((await response.json()) as { speaking: string[] }).speaking;
      for (const [userId, m] of meters) m.row.classList.toggle("speaking", demo.speaking.includes(userId));
    }
  } catch (e) {
    log(`speaking: ${e}`);
  } finally {
    speakingBusy = false;
  }
}, 250);

joinButton.addEventListener("click", () => void join());
leaveButton.addEventListener("click", () => void leave());
setState("idle");
if (query.get("autojoin") === "1") void join();
