// The console's status page desk. Maintenance windows are entered in the browser's local
// time; on submit each local input fills its hidden field (data-iso-target) with ISO 8601
// carrying the browser's UTC offset, so the server never guesses a time zone.
"use strict";

function isoWithOffset(text) {
  const d = new Date(text); // "YYYY-MM-DDTHH:MM" without an offset is local time
  if (!text || Number.isNaN(d.getTime())) return "";
  const pad = (n) => String(Math.abs(n)).padStart(2, "0");
  const offset = -d.getTimezoneOffset();
  const sign = offset >= 0 ? "+" : "-";
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}` +
    `T${pad(d.getHours())}:${pad(d.getMinutes())}:00` +
    `${sign}${pad(Math.trunc(offset / 60))}:${pad(offset % 60)}`;
}

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement)) return;
  for (const input of form.querySelectorAll("input[data-iso-target]")) {
    const target = form.elements.namedItem(input.dataset.isoTarget);
    if (target instanceof HTMLInputElement) target.value = isoWithOffset(input.value);
  }
});
