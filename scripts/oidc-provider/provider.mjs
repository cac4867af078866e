// A real OpenID Provider for Borough's OIDC tests: panva's certified
// oidc-provider, configured for machine clients only (client_credentials) and
// JWT access tokens that carry a tenant and roles.
//
//   node provider.mjs [PORT]          serve (PORT or $OIDC_PORT; 0 = any free)
//   node provider.mjs keygen KID [ALG] print a new private signing JWK
//                                     (ALG: RS256 default, PS256, ES256)
//
// Environment:
//   OIDC_KEYS_FILE  a JWKS of private keys ({"keys": [...]}); the first key
//                   that fits the signing algorithm signs, the others are
//                   only published. Required: the provider's built-in
//                   development keys are never used.
//   OIDC_AUDIENCE   the access tokens' `aud` (default urn:borough:api)
//   OIDC_TOKEN_ALG  the access tokens' signing algorithm (default RS256)
//
// It prints `listening on http://127.0.0.1:PORT` once it answers; the issuer
// is that URL. oidc-provider cannot swap keys in a running process, so key
// rotation is a restart on the same port with another OIDC_KEYS_FILE. SIGTERM
// and SIGINT stop it with exit code 0.
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';

import Provider, { errors } from 'oidc-provider';

// Fixed test clients; the secret is the client id with `-secret` appended.
// `tenant` and `roles` are client metadata copied into every access token.
const CLIENTS = [
  { client_id: 'city-editor', tenant: 'city', roles: ['editor'] },
  { client_id: 'city-viewer', tenant: 'city', roles: ['viewer'] },
  { client_id: 'other-admin', tenant: 'other', roles: ['tenant-admin'] },
];

function keygen(kid, alg = 'RS256') {
  if (!kid) throw new Error('usage: provider.mjs keygen KID [RS256|PS256|ES256]');
  const { privateKey } = alg === 'ES256'
    ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
    : generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
}

function serve(port) {
  const keysFile = process.env.OIDC_KEYS_FILE;
  if (!keysFile) throw new Error('OIDC_KEYS_FILE must name a JWKS file of private keys');
  const jwks = JSON.parse(readFileSync(keysFile, 'utf8'));
  const audience = process.env.OIDC_AUDIENCE || 'urn:borough:api';
  const tokenAlg = process.env.OIDC_TOKEN_ALG || 'RS256';

  // The issuer names the bound port, so bind first and attach the provider after.
  let handler = (req, res) => {
    res.statusCode = 503;
    res.end();
  };
  const server = createServer((req, res) => handler(req, res));
  server.listen(port, '127.0.0.1', () => {
    const issuer = `http://127.0.0.1:${server.address().port}`;
    const provider = new Provider(issuer, {
      jwks,
      clients: CLIENTS.map((c) => ({
        ...c,
        client_secret: `${c.client_id}-secret`,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      })),
      extraClientMetadata: {
        properties: ['tenant', 'roles'],
        validator(ctx, key, value) {
          const ok = key === 'tenant'
            ? typeof value === 'string'
            : Array.isArray(value) && value.every((r) => typeof r === 'string');
          if (!ok) throw new Error(`client metadata ${key} has the wrong type`);
        },
      },
      async extraTokenClaims(ctx, token) {
        const client = await provider.Client.find(token.clientId);
        return client ? { tenant: client.tenant, roles: client.roles } : undefined;
      },
      features: {
        devInteractions: { enabled: false },
        clientCredentials: { enabled: true },
        introspection: { enabled: false },
        revocation: { enabled: false },
        resourceIndicators: {
          enabled: true,
          // No `resource` parameter still yields a JWT for Borough's API.
          defaultResource: () => audience,
          useGrantedResource: () => true,
          getResourceServerInfo: (ctx, resource) => {
            if (resource !== audience) throw new errors.InvalidTarget();
            return {
              scope: 'entities:read entities:write',
              audience,
              accessTokenTTL: 300,
              accessTokenFormat: 'jwt',
              jwt: { sign: { alg: tokenAlg } },
            };
          },
        },
      },
      cookies: { keys: ['borough-oidc-test-cookie-key'] },
    });
    provider.on('server_error', (ctx, err) => console.error('server_error', err));
    handler = provider.callback();
    console.log(`listening on ${issuer}`);
  });

  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

const [command, ...args] = process.argv.slice(2);
if (command === 'keygen') {
  console.log(JSON.stringify(keygen(...args)));
} else {
  const port = Number(command ?? process.env.OIDC_PORT ?? 0);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`bad port ${command ?? process.env.OIDC_PORT}`);
  }
  serve(port);
}
