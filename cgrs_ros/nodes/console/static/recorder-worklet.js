// Push-to-talk: hands each block of microphone samples (mono, float32) to the page.
class PcmRecorder extends AudioWorkletProcessor {
  process(inputs) {
    const input = inputs[0];
    if (input && input[0]) this.port.postMessage(input[0].slice(0));
    return true;
  }
}
registerProcessor('pcm-recorder', PcmRecorder);
