import { formatSize } from "@udm/kcopyd";
import cliProgress from "cli-progress";

/** How often plain (non-TTY) progress lines are printed. */
export const PLAIN_PROGRESS_INTERVAL_MS = 2000;

/** Reports the progress of long work: a bar on a TTY, periodic plain lines otherwise. */
export interface ProgressReporter {
  update(doneBytes: number, totalBytes?: number): void;
  /** The work finished: the bar is drawn at 100 % (a plain reporter that printed adds a last line), then stops. */
  done(): void;
  /** Stops where it is (failure, interrupt) and gives the terminal its cursor back. */
  stop(): void;
}

/** Process-wide progress settings: `--progress` / `--no-progress` / `--progress-interval`. */
export interface ProgressSettings {
  /** false: no progress at all (`--no-progress`, or `-q` without `--progress`). */
  enabled: boolean;
  /** Seconds between plain lines without a terminal, in ms. */
  intervalMs: number;
}

let settings: ProgressSettings = { enabled: true, intervalMs: PLAIN_PROGRESS_INTERVAL_MS };

/** Sets how every later `createProgress` behaves (the CLI calls this from its global options). */
export function configureProgress(next: Partial<ProgressSettings>): void {
  settings = { ...settings, ...next };
}

const silent: ProgressReporter = { update() {}, done() {}, stop() {} };

/**
 * A progress reporter on `stream` (stderr by default): cli-progress bar when it is a TTY,
 * otherwise one line every few seconds such as `copy: 512.0 MiB / 1.00 GiB (50.0%), 120.3 MiB/s, ETA 4 s`.
 *
 * @example
 * ```ts
 * const progress = createProgress("copy", totalBytes);
 * client.on("progress", (p) => progress.update(p.doneSectors * 512));
 * progress.done();
 * ```
 */
export function createProgress(
  label: string,
  totalBytes: number,
  options: { stream?: NodeJS.WritableStream & { isTTY?: boolean }; tty?: boolean; intervalMs?: number } = {},
): ProgressReporter {
  if (!settings.enabled) return silent;
  const stream = options.stream ?? process.stderr;
  const intervalMs = options.intervalMs ?? settings.intervalMs;
  const started = Date.now();
  let total = totalBytes;
  let last = 0;
  const rate = (done: number) => done / 2 ** 20 / Math.max((Date.now() - started) / 1000, 0.001);
  if (options.tty ?? stream.isTTY === true) {
    const bar = new cliProgress.SingleBar(
      {
        stream,
        format: `${label} [{bar}] {percentage}% | {doneText} / {totalText} | {rate} MiB/s | ETA {eta_formatted}`,
        hideCursor: true,
        // Draw even on a stream that does not say it is a TTY when the caller forced `tty`.
        noTTYOutput: options.tty === true,
        etaBuffer: 50,
      },
      cliProgress.Presets.shades_classic,
    );
    bar.start(total, 0, { doneText: formatSize(0), totalText: formatSize(total), rate: "0.0" });
    let stopped = false;
    const update = (done: number, newTotal?: number) => {
      if (stopped) return;
      if (newTotal !== undefined && newTotal !== total) {
        total = newTotal;
        bar.setTotal(total);
      }
      last = done;
      bar.update(done, {
        doneText: formatSize(done),
        totalText: formatSize(total),
        rate: rate(done).toFixed(1),
      });
    };
    const stop = () => {
      if (stopped) return;
      stopped = true;
      bar.stop();
    };
    return {
      update,
      done() {
        update(Math.max(last, total));
        stop();
      },
      stop,
    };
  }
  let lastPrinted = started;
  let printed = false;
  const line = (done: number) => {
    const mibps = rate(done);
    const pct = total > 0 ? ((100 * done) / total).toFixed(1) : "100.0";
    const eta = mibps > 0 && total > done ? `, ETA ${Math.ceil((total - done) / 2 ** 20 / mibps)} s` : "";
    stream.write(
      `${label}: ${formatSize(done)} / ${formatSize(total)} (${pct}%), ${mibps.toFixed(1)} MiB/s${eta}\n`,
    );
    printed = true;
  };
  return {
    update(done, newTotal) {
      if (newTotal !== undefined) total = newTotal;
      last = done;
      const now = Date.now();
      if (now - lastPrinted < intervalMs) return;
      lastPrinted = now;
      line(done);
    },
    done() {
      // A job long enough to have printed a line ends on a 100 % line; a short one stays quiet.
      if (printed) line(Math.max(last, total));
    },
    stop() {},
  };
}
