import { PassThrough } from "node:stream";
import { describe, expect, test } from "vitest";
import { createProgress } from "./progress.js";

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
});
