// Formatting: bytes, rates, durations, times and a few labels, as the CLI prints them.

export function fmtBytes(value) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "—";
  let v = Number(value);
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (Math.abs(v) < 1024 || unit === "TiB") {
      return unit === "B" ? `${v.toFixed(0)} B` : `${v.toFixed(1)} ${unit}`;
    }
    v /= 1024;
  }
  return "—";
}

export function fmtMiB(mib) {
  if (mib === null || mib === undefined) return "—";
  return mib >= 1024 ? `${(mib / 1024).toFixed(mib % 1024 ? 1 : 0)} GiB` : `${mib} MiB`;
}

/** Bytes per second as MB/s (10^6, as the CLI prints). */
export function fmtRate(bps) {
  if (bps === null || bps === undefined || Number.isNaN(Number(bps))) return "—";
  return `${(Number(bps) / 1e6).toFixed(1)} MB/s`;
}

export function fmtLink(bps) {
  if (!bps) return "—";
  const mbit = (Number(bps) * 8) / 1e6;
  return mbit >= 1000 ? `${(mbit / 1000).toFixed(mbit % 1000 ? 1 : 0)} Gbit/s` : `${mbit.toFixed(0)} Mbit/s`;
}

export function fmtMs(ms) {
  return ms === null || ms === undefined ? "—" : `${Math.round(Number(ms)).toLocaleString("en-US")} ms`;
}

export function fmtSeconds(sec) {
  if (sec === null || sec === undefined) return "—";
  const v = Number(sec);
  if (v < 60) return `${v.toFixed(v < 10 ? 1 : 0)} s`;
  const m = Math.floor(v / 60);
  return `${m} min ${Math.round(v - m * 60)} s`;
}

/** The center writes times as ISO strings; SQLite drops the zone, and they are UTC. */
export function parseTime(text) {
  if (!text) return null;
  const zoned = /([zZ]|[+-]\d\d:?\d\d)$/.test(text) ? text : `${text}Z`;
  const d = new Date(zoned);
  return Number.isNaN(d.getTime()) ? null : d;
}

export function fmtClock(date) {
  if (!date) return "—";
  const pad = (n) => String(n).padStart(2, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

export function fmtDateTime(date) {
  if (!date) return "—";
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${fmtClock(date)}`;
}

export function fmtDuration(ms) {
  if (ms === null || ms === undefined || ms < 0) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return fmtSeconds(ms / 1000);
}

export function vendorName(vendor) {
  const v = String(vendor || "").toLowerCase();
  if (v.includes("intel")) return "Intel";
  if (v.includes("amd")) return "AMD";
  return vendor || "unknown";
}

export const POWER_LABEL = {
  poweredOn: "Powered on",
  poweredOff: "Powered off",
  incoming: "Incoming (migration)",
  suspended: "Suspended",
};

export function plural(n, word, many = `${word}s`) {
  return `${n} ${n === 1 ? word : many}`;
}
