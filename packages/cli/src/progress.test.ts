import { PassThrough } from "node:stream";
import { describe, expect, test } from "vitest";
import { configureProgress, createProgress } from "./progress.js";

function sink() {
  const stream = new PassThrough();
  let text = "";
  stream.on("data", (d) => {
    text += d;
  });
  return { stream, text: () => text };
}

describe("createProgress", () => {
  test("without a TTY it prints plain lines with sizes, percentage, rate and ETA", () => {
    const out = sink();
    const p = createProgress("copy", 4 * 2 ** 20, { stream: out.stream, tty: false, intervalMs: 0 });
    p.update(2 ** 20);
    p.update(2 * 2 ** 20, 8 * 2 ** 20);
    p.stop();
    const lines = out.text().trim().split("\n");
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(/^copy: 1\.00 MiB \/ 4\.00 MiB \(25\.0%\), [\d.]+ MiB\/s(, ETA \d+ s)?$/);
    expect(lines[1]).toMatch(/^copy: 2\.00 MiB \/ 8\.00 MiB \(25\.0%\)/);
    expect(out.text().includes("\u001b[")).toBe(false); // no terminal escapes in logs
  });

  test("with a TTY it draws a cli-progress bar", () => {
    const out = sink();
    const p = createProgress("merge", 1000, {
      stream: out.stream as unknown as NodeJS.WriteStream,
      tty: true,
    });
    p.update(500);
    p.stop();
    expect(out.text()).toMatch(/merge \[.*\] 50% \| 500 B \/ 1000 B/);
  });

  test("done() draws the bar full even when the last update saw less", () => {
    const out = sink();
    const p = createProgress("merge", 32 * 2 ** 20, {
      stream: out.stream as unknown as NodeJS.WriteStream,
      tty: true,
    });
    p.update(0);
    p.done();
    expect(out.text()).toMatch(/merge \[.*\] 100% \| 32\.0 MiB \/ 32\.0 MiB/);
    const drawn = out.text();
    p.update(5); // after done(): ignored
    expect(out.text()).toBe(drawn);
  });

  test("without a TTY, done() ends on a 100 % line only when lines were printed", () => {
    const quiet = sink();
    const short = createProgress("copy", 1000, { stream: quiet.stream, tty: false, intervalMs: 60_000 });
    short.update(500);
    short.done();
    expect(quiet.text()).toBe("");
    const out = sink();
    const long = createProgress("resync", 1000, { stream: out.stream, tty: false, intervalMs: 0 });
    long.update(500);
    long.done();
    const lines = out.text().trim().split("\n");
    expect(lines).toHaveLength(2);
    expect(lines[1]).toMatch(/^resync: 1000 B \/ 1000 B \(100\.0%\)/);
  });

  test("configureProgress({ enabled: false }) silences every reporter", () => {
    const out = sink();
    configureProgress({ enabled: false });
    try {
      const p = createProgress("copy", 1000, { stream: out.stream, tty: false, intervalMs: 0 });
      p.update(500);
      p.done();
    } finally {
      configureProgress({ enabled: true });
    }
    expect(out.text()).toBe("");
  });
});
