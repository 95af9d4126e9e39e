// Bundled into tests/browser/static/harness.js by scripts/web_build.sh (not committed): the
// page of tests/test_interop_chromium.py uses window.mediasoupClient.
import * as mediasoupClient from "mediasoup-client";

window.mediasoupClient = mediasoupClient;
