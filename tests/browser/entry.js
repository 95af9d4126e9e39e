// Bundled by esbuild into static/harness.js (at test setup, not committed): the page uses
// window.mediasoupClient.
import * as mediasoupClient from "mediasoup-client";

window.mediasoupClient = mediasoupClient;
