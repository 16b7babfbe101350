// Requests to the admin API with the admin token, which the page asks for
// once and keeps for the tab (sessionStorage): closing the tab forgets it.

const KEY = "wirestub-admin-token";
let onUnauthorized = null;

export const token = () => sessionStorage.getItem(KEY) || "";

export function setToken(t) {
  if (t) sessionStorage.setItem(KEY, t);
  else sessionStorage.removeItem(KEY);
}

/** `f(message)` is called when a request is refused for want of the token. */
export function whenUnauthorized(f) {
  onUnauthorized = f;
}

/**
 * Calls the admin API: `{status, ok, data}` where data is the parsed JSON
 * (or text); status 0 when the engine cannot be reached.
 */
export async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  const t = token();
  if (t) headers.authorization = `Bearer ${t}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  let r;
  try {
    r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    return { status: 0, ok: false, data: { error: `the engine cannot be reached (${e.message})` } };
  }
  const text = await r.text();
  let data = text;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON (the Prometheus text of /metrics): kept as text.
  }
  if (r.status === 401 && onUnauthorized) onUnauthorized(data && data.error);
  return { status: r.status, ok: r.ok, data };
}

/** The error message of a failed answer. */
export const errorOf = (res) => (res.data && res.data.error) || `HTTP ${res.status}`;

/** Tells the page that the plan may have changed (a save, a reload). */
export const planChanged = () => window.dispatchEvent(new Event("wirestub:plan"));

/** A path segment, percent-encoded. */
export const seg = (s) => encodeURIComponent(s);

/** `/pkg.Service/Method` into the admin route of its rules. */
export function rulesPath(methodPath, index) {
  const [, service, name] = methodPath.split("/");
  const base = `/admin/methods/${seg(service)}/${seg(name)}/rules`;
  return index === undefined ? base : `${base}/${index}`;
}
