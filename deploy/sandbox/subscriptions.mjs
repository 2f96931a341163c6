// R4 Subscriptions (rest-hook) for the sandbox: after a request that wrote resources, every
// active Subscription whose criteria match one of them is notified, as a real FHIR server does.
//   channel.payload absent:  POST {endpoint}            (empty body: "something changed")
//   channel.payload present: PUT  {endpoint}/{type}/{id} with the resource (R4 rest-hook)
// channel.header lines ("Authorization: Bearer ...") are sent as HTTP headers. Delivery is
// best-effort, after the writing request answered (one try, 5 s timeout, failures logged): it
// must never hold up or fail the write. Subscriptions with status "requested" count as active
// (the sandbox accepts them as a server would activate them).
export class SubscriptionNotifier {
  #written = [];

  /** @param {(type: string, query: string) => Promise<object[]>} search matching resources */
  constructor(search) {
    this.search = search;
    this.sent = 0;
    this.failed = 0;
  }

  /** Called for every resource the repository writes (inside the request's lock). */
  record(resource) {
    if (resource?.resourceType && resource.resourceType !== 'Subscription') this.#written.push(resource);
  }

  /** What the current request wrote; call inside the lock, once the request is done. */
  take() {
    const written = this.#written;
    this.#written = [];
    return written;
  }

  /** Matches and delivers; `locked` runs a function under the sandbox's request lock. */
  async deliver(written, locked) {
    if (written.length === 0) return;
    const targets = await locked(async () => {
      const subs = await this.search('Subscription', 'status=active,requested');
      const out = [];
      for (const sub of subs) {
        if (sub.channel?.type !== 'rest-hook' || !sub.channel?.endpoint) continue;
        const [type, query = ''] = String(sub.criteria ?? '').split('?');
        for (const resource of written) {
          if (resource.resourceType !== type) continue;
          const params = new URLSearchParams(query);
          params.set('_id', resource.id);
          if ((await this.search(type, params.toString())).length > 0) out.push([sub, resource]);
        }
      }
      return out;
    });
    await Promise.all(targets.map(([sub, resource]) => this.#send(sub, resource)));
  }

  async #send(sub, resource) {
    const headers = {};
    for (const line of sub.channel.header ?? []) {
      const at = line.indexOf(':');
      if (at > 0) headers[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    const payload = sub.channel.payload;
    const url = new URL(sub.channel.endpoint); // its query (e.g. ?fhirServer=) stays at the end
    if (payload) url.pathname = `${url.pathname.replace(/\/+$/, '')}/${resource.resourceType}/${resource.id}`;
    const init = payload
      ? { method: 'PUT', body: JSON.stringify(resource), headers: { ...headers, 'Content-Type': payload } }
      : { method: 'POST', headers };
    try {
      const response = await fetch(url, { ...init, signal: AbortSignal.timeout(5000) });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      this.sent++;
    } catch (err) {
      this.failed++;
      console.error(`Subscription/${sub.id} notification to ${url} failed: ${err.message}`);
    }
  }
}
