import type { Command } from "commander";
import { describe, expect, test } from "vitest";
import { buildProgram, formatProgress } from "./cli.js";

function allCommands(cmd: Command): Command[] {
  return [cmd, ...cmd.commands.flatMap(allCommands)];
}

function helpOf(cmd: Command): string {
  let text = "";
  cmd.configureOutput({ writeOut: (s) => (text += s), writeErr: (s) => (text += s) });
  cmd.outputHelp();
  return text;
}

describe("udm command line", () => {
  const commands = allCommands(buildProgram()).filter((c) => c.name() !== "help");

  test("has the dmsetup verbs, serve, copy, snapshot and mirror commands", () => {
    const names = commands.map((c) =>
      c.parent && c.parent.name() !== "udm" ? `${c.parent.name()} ${c.name()}` : c.name(),
    );
    for (const n of [
      "serve",
      "copy",
      "create",
      "remove",
      "ls",
      "table",
      "status",
      "info",
      "suspend",
      "resume",
      "reload",
      "message",
      "rename",
      "deps",
      "targets",
      "version",
      "wait",
      "snapshot create",
      "snapshot merge",
      "snapshot status",
      "snapshot inspect",
      "mirror status",
      "mirror resync",
      "mirror inspect-log",
    ]) {
      expect(names).toContain(n);
    }
  });

  test.each(
    allCommands(buildProgram())
      .filter((c) => c.name() !== "help")
      .map((c) => [c.name(), c] as const),
  )("%s --help shows an example", (_name, cmd) => {
    expect(helpOf(cmd)).toMatch(/\nExample( \(a session\))?:\n {2}udm /);
  });

  test("every query verb has --json", () => {
    for (const c of commands.filter((c) =>
      ["ls", "table", "status", "info", "inspect", "inspect-log"].includes(c.name()),
    )) {
      expect(c.options.map((o) => o.long)).toContain("--json");
    }
  });

  test("progress lines give sizes, percent and ETA when known", () => {
    expect(formatProgress({ operation: "merge", doneBytes: 512, totalBytes: 1024 })).toBe(
      "merge: 512 B / 1.00 KiB (50.0%)",
    );
    expect(
      formatProgress({ operation: "resync", doneBytes: 3 << 20, totalBytes: 1 << 30, etaSeconds: 40.2 }),
    ).toBe("resync: 3.00 MiB / 1.00 GiB (0.3%), ETA 41 s");
    expect(formatProgress({ operation: "copy", doneBytes: 0, totalBytes: 0 })).toBe(
      "copy: 0 B / 0 B (100.0%)",
    );
  });
});
