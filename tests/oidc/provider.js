// A real OpenID Connect provider (oidc-provider) for tailgate's sign-in
// tests. Usage: node provider.js CONFIG.json
//
// CONFIG.json (re-read on every account lookup and token request, so a test
// can change users' groups or the misbehaviour without a restart):
//   { "issuer": "http://10.0.0.1:9443", "listen": "10.0.0.1", "port": 9443,
//     "keys_file": "/tmp/x/keys.json",      // signing keys, kept across restarts
//     "rotate_key": false,                  // true: sign with a new key from this start
//     "clients": [{ "client_id": "tg", "client_secret": "s", "redirect_uris": ["http://.../oidc/callback"] }],
//     "users": { "alice": { "email": "alice@example.com", "email_verified": true, "groups": ["admins"] } },
//     "misbehave": "" }   // "" | "wrong_aud" | "bad_signature" | "expired": how the ID token is spoiled
// Logins go through the provider's own login and consent pages (any
// password); the login name is the key in "users".
import fs from 'node:fs';
import { Provider } from 'oidc-provider';
import { generateKeyPair, exportJWK, importJWK, SignJWT, decodeJwt } from 'jose';

const configPath = process.argv[2];
const config = () => JSON.parse(fs.readFileSync(configPath, 'utf8'));
const start = config();

async function newKey(kid) {
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  return { ...(await exportJWK(privateKey)), kid, alg: 'RS256', use: 'sig' };
}

let keys = fs.existsSync(start.keys_file) ? JSON.parse(fs.readFileSync(start.keys_file, 'utf8')) : [];
if (keys.length === 0 || start.rotate_key) {
  keys = [await newKey(`k${Date.now()}`), ...keys];
  fs.writeFileSync(start.keys_file, JSON.stringify(keys), { mode: 0o600 });
}
const signing = keys[0];

const provider = new Provider(start.issuer, {
  clients: start.clients.map((c) => ({ ...c, grant_types: ['authorization_code'], response_types: ['code'] })),
  jwks: { keys },
  cookies: { keys: ['tailgate-test-cookie-key'] },
  scopes: ['openid', 'email', 'profile', 'groups'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'] },
  pkce: { required: () => true },
  // The ID token carries the claims, as most providers do for the code flow.
  conformIdTokenClaims: false,
  async findAccount(ctx, id) {
    const u = config().users[id];
    if (!u) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: u.email, email_verified: u.email_verified !== false, name: id, groups: u.groups || [] };
      },
    };
  },
});

// Spoils the ID token of a token response as configured: re-signed with
// the provider's own key for a wrong audience or an expired token, with a
// stranger's key (same kid) for a bad signature.
const stranger = await newKey(signing.kid);
provider.use(async (ctx, next) => {
  await next();
  const mode = config().misbehave || '';
  if (ctx.path !== '/token' || !mode || !ctx.body || !ctx.body.id_token) return;
  const claims = decodeJwt(ctx.body.id_token);
  let key = signing;
  if (mode === 'wrong_aud') claims.aud = 'someone-else';
  if (mode === 'expired') { claims.iat -= 7200; claims.exp = Math.floor(Date.now() / 1000) - 3600; }
  if (mode === 'bad_signature') key = stranger;
  const pk = await importJWK(key, 'RS256');
  ctx.body = { ...ctx.body, id_token: await new SignJWT(claims).setProtectedHeader({ alg: 'RS256', kid: signing.kid }).sign(pk) };
  console.log(`provider: spoiled an ID token (${mode})`);
});

provider.listen(start.port, start.listen, () => {
  console.log(`provider: listening on ${start.issuer}`);
});
