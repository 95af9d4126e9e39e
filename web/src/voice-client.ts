// A Harmony voice client: protocol.voice.v1 over hRPC (@harmony-dev/transport-hrpc) driving
// mediasoup-client, following the client flow of docs/harmony.md#client-side with a shared certificate,
// so the consumer transport's DTLS parameters are known before JoinChannel.
import { HrpcTransport } from "@harmony-dev/transport-hrpc";
import { Device } from "mediasoup-client";
import type { Consumer, Producer, Transport } from "mediasoup-client/types";
import type {
  StreamMessageRequest,
  StreamMessageResponse,
  TransportOptions,
  UserConsumerOptions,
} from "../gen/fastsfu/_proto/protocol/voice/v1/voice";
import { VoiceServiceClient } from "../gen/fastsfu/_proto/protocol/voice/v1/voice.client";

type Kind = NonNullable<StreamMessageResponse["message"]["oneofKind"]>;
type Message<K extends Kind> = Extract<StreamMessageResponse["message"], { oneofKind: K }>;

export interface Peer {
  userId: string;
  consumer: Consumer;
}

export interface VoiceEvents {
  onPeerJoined?: (peer: Peer) => void;
  onPeerLeft?: (userId: string) => void;
  onClosed?: (error: { code: string; message: string } | null) => void;
  onLog?: (line: string) => void;
}

/** One voice session: open with `join()`, end with `leave()`. */
export class VoiceConnection {
  readonly peers = new Map<string, Peer>();
  sendTransport: Transport | null = null;
  recvTransport: Transport | null = null;
  producer: Producer | null = null;
  error: { code: string; message: string } | null = null;
  closed = false;

  private call: ReturnType<VoiceServiceClient["streamMessage"]> | null = null;
  private inbox: StreamMessageResponse[] = [];
  private waiter: (() => void) | null = null;
  private joined = false;
  private peerQueue: Promise<void> = Promise.resolve();

  constructor(
    private readonly baseUrl: string,
    private readonly token: string,
    private readonly events: VoiceEvents = {},
  ) {}

  private log(line: string): void {
    this.events.onLog?.(line);
  }

  private send(message: StreamMessageRequest["message"]): Promise<void> {
    if (!this.call) throw new Error("not connected");
    return this.call.requests.send({ message });
  }

  /** The next response, which must be of `kind` (the server sends nothing else before joining). */
  private async expect<K extends Kind>(kind: K, timeoutMs = 30000): Promise<Message<K>> {
    const deadline = Date.now() + timeoutMs;
    while (this.inbox.length === 0) {
      if (this.closed) throw new Error(this.error ? `${this.error.code}: ${this.error.message}` : "stream closed");
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no ${kind} within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    const next = this.inbox.shift()!.message;
    if (next.oneofKind !== kind) throw new Error(`expected ${kind}, got ${next.oneofKind}`);
    return next as Message<K>;
  }

  private wake(): void {
    const waiter = this.waiter;
    this.waiter = null;
    waiter?.();
  }

  private onResponse(response: StreamMessageResponse): void {
    const m = response.message;
    if (!this.joined) {
      this.inbox.push(response);
      this.wake();
    } else if (m.oneofKind === "userJoined" && m.userJoined.data) {
      const data = m.userJoined.data;
      this.serially(() => this.addPeer(data));
    } else if (m.oneofKind === "userLeft") {
      const userId = m.userLeft.userId;
      this.serially(() => this.removePeer(userId));
    } else {
      this.log(`ignored ${m.oneofKind}`);
    }
  }

  private finish(error: { code: string; message: string } | null): void {
    if (this.closed) return;
    this.closed = true;
    this.error = error;
    this.log(error ? `stream ended: ${error.code}: ${error.message}` : "stream ended");
    this.teardown();
    this.wake();
    this.events.onClosed?.(error);
  }

  /** Join (guild, channel), sending `track`. Resolves once JoinedChannel arrived. */
  async join(guildId: string, channelId: string, track: MediaStreamTrack): Promise<void> {
    const transport = new HrpcTransport({ baseUrl: this.baseUrl });
    if (this.token) transport.setSession(this.token); // Sec-WebSocket-Protocol: hrpc1, <token>
    this.call = new VoiceServiceClient(transport).streamMessage();
    this.call.responses.onMessage((r) => this.onResponse(r));
    this.call.responses.onError((e) => {
      const err = e as { code?: string; message?: string };
      this.finish({ code: err.code || "stream-error", message: err.message || String(e) });
    });
    this.call.responses.onComplete(() => this.finish(this.error));

    await this.send({ oneofKind: "initialize", initialize: { guildId, channelId } });
    const initialized = await this.expect("initialized");
    const device = new Device();
    await device.load({ routerRtpCapabilities: JSON.parse(initialized.initialized.rtpCapabilities) });
    this.log(`device ${device.handlerName}`);

    await this.send({
      oneofKind: "prepareForJoinChannel",
      prepareForJoinChannel: { rtpCapabilities: JSON.stringify(device.recvRtpCapabilities) },
    });
    const prepared = (await this.expect("preparedForJoinChannel")).preparedForJoinChannel;
    if (!prepared.producerTransportOptions || !prepared.consumerTransportOptions) {
      throw new Error("PreparedForJoinChannel without transport options");
    }
    // One certificate on both transports: the consumer DTLS parameters are then known before the
    // first consume() (docs/harmony.md#client-side).
    const cert = await RTCPeerConnection.generateCertificate({ name: "ECDSA", namedCurve: "P-256" } as AlgorithmIdentifier);
    const extra = { additionalSettings: { certificates: [cert] } };
    const send = device.createSendTransport({ ...transportOptions(prepared.producerTransportOptions), ...extra });
    const recv = device.createRecvTransport({ ...transportOptions(prepared.consumerTransportOptions), ...extra });
    this.sendTransport = send;
    this.recvTransport = recv;
    const consumerDtls = { role: "client", fingerprints: cert.getFingerprints() };
    recv.on("connect", (_params, callback) => callback());
    let producerDtls: unknown = null;
    let rtpParameters: unknown = null;
    send.on("connect", ({ dtlsParameters }, callback) => {
      producerDtls = dtlsParameters;
      callback();
    });
    // The protocol never returns a producer ID, so any local one will do.
    send.on("produce", (params, callback) => {
      rtpParameters = params.rtpParameters;
      callback({ id: "local" });
    });
    for (const t of [send, recv]) {
      t.on("connectionstatechange", (state) => this.log(`${t === send ? "send" : "recv"} transport ${state}`));
    }
    this.producer = await send.produce({ track });
    if (!producerDtls || !rtpParameters) throw new Error("produce() gave no DTLS or RTP parameters");

    await this.send({
      oneofKind: "joinChannel",
      joinChannel: {
        rtpParamaters: JSON.stringify(rtpParameters),
        producerDtlsParamaters: JSON.stringify(producerDtls),
        consumerDtlsParamaters: JSON.stringify(consumerDtls),
      },
    });
    const joined = (await this.expect("joinedChannel")).joinedChannel;
    this.joined = true; // from now on, responses are UserJoined / UserLeft events
    this.log(`joined with ${joined.otherUsers.length} other user(s)`);
    for (const other of joined.otherUsers) this.serially(() => this.addPeer(other));
    for (const r of this.inbox.splice(0)) this.onResponse(r); // events right behind JoinedChannel
    await this.peerQueue;
  }

  /** Peer changes run one at a time, in arrival order (a UserLeft may follow a UserJoined at once). */
  private serially(step: () => Promise<void> | void): void {
    this.peerQueue = this.peerQueue.then(step).catch((e) => this.log(`event failed: ${e}`));
  }

  private async addPeer(options: UserConsumerOptions): Promise<void> {
    if (!this.recvTransport || this.closed) return;
    this.removePeer(options.userId);
    const consumer = await this.recvTransport.consume({
      id: options.consumerId,
      producerId: options.producerId,
      kind: "audio",
      rtpParameters: JSON.parse(options.rtpParameters),
    });
    const peer = { userId: options.userId, consumer };
    this.peers.set(options.userId, peer);
    // Resume with the ID exactly as received (docs/harmony.md#ids).
    await this.send({ oneofKind: "resumeConsumer", resumeConsumer: { consumerId: options.consumerId } });
    this.log(`hearing user ${options.userId}`);
    this.events.onPeerJoined?.(peer);
  }

  private removePeer(userId: string): void {
    const peer = this.peers.get(userId);
    if (!peer) return;
    this.peers.delete(userId);
    peer.consumer.close();
    this.log(`user ${userId} left`);
    this.events.onPeerLeft?.(userId);
  }

  private teardown(): void {
    for (const userId of [...this.peers.keys()]) this.removePeer(userId);
    this.producer?.close();
    this.sendTransport?.close();
    this.recvTransport?.close();
  }

  /** Leave: complete the request stream (a close with no status code, which the server treats as leave). */
  async leave(): Promise<void> {
    if (this.call && !this.closed) await this.call.requests.complete();
    this.finish(null);
  }
}

function transportOptions(o: TransportOptions) {
  return {
    id: o.id,
    iceParameters: JSON.parse(o.iceParameters),
    iceCandidates: o.iceCandidates.map((c) => JSON.parse(c)),
    dtlsParameters: JSON.parse(o.dtlsParameters),
  };
}
