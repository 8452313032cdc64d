//! Sign-in with an OpenID Connect identity provider (issue 13).
//!
//! Discovery, JWKS, the code exchange and every ID token check (signature,
//! issuer, audience, expiry, nonce) are the `openidconnect` crate's; this
//! module keeps the sign-ins in flight and applies the server's allow-lists.
//!
//! A node that joins without an auth key gets a *login* (a random id, short
//! lived, single use) and the URL `<server>/oidc/start/<id>`. Opening it
//! creates a *flow* (PKCE verifier, state, nonce) and redirects to the
//! provider; the provider sends the browser back to `<server>/oidc/callback`
//! with the state, which is looked up and consumed (a replay finds nothing),
//! then the code is exchanged and the ID token verified. The outcome goes to
//! the waiting node's connection through a oneshot channel.
//!
//! All calls to the provider are blocking (ureq, with connect and overall
//! timeouts, no redirects); callers run them on a blocking thread.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreErrorResponseType, CoreGenderClaim, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm, CoreProviderMetadata, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken, EmptyExtraTokenFields,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IdTokenFields, IssuerUrl, JsonWebKeySet, Nonce, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, Scope, SignatureVerificationError, StandardErrorResponse, StandardTokenResponse, TokenResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// How the server is configured to use the provider (`tailgate control --oidc-*`).
#[derive(Clone)]
pub(crate) struct OidcConfig {
    /// `--oidc-issuer`: discovery starts at `<issuer>/.well-known/openid-configuration`.
    pub(crate) issuer: String,
    /// `--oidc-client-id`: this server's client at the provider.
    pub(crate) client_id: String,
    /// Read from `--oidc-client-secret-file`; never logged.
    pub(crate) client_secret: String,
    /// Email domains allowed to sign in (empty: any).
    pub(crate) allowed_domains: Vec<String>,
    /// Emails allowed to sign in (empty: any).
    pub(crate) allowed_users: Vec<String>,
    /// Provider groups of which a user must be in one (empty: any).
    pub(crate) allowed_groups: Vec<String>,
    /// ID token claim holding the user's groups.
    pub(crate) groups_claim: String,
    /// Scopes asked for besides `openid`.
    pub(crate) scopes: Vec<String>,
    /// Lifetime of a sign-in URL (and of the browser's round trip).
    pub(crate) login_ttl: Duration,
    /// Limit on each call to the provider.
    pub(crate) http_timeout: Duration,
}

impl OidcConfig {
    /// The defaults (`email profile groups` scopes, `groups` claim, 10-minute
    /// sign-ins, 10 s provider calls) for this client of this issuer.
    pub(crate) fn new(issuer: &str, client_id: &str, client_secret: &str) -> OidcConfig {
        OidcConfig {
            issuer: issuer.into(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            allowed_domains: Vec::new(),
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
            groups_claim: "groups".into(),
            scopes: vec!["email".into(), "profile".into(), "groups".into()],
            login_ttl: Duration::from_secs(600),
            http_timeout: Duration::from_secs(10),
        }
    }
}

/// `tailgate control --oidc-*`.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct OidcArgs {
    /// Let people join by signing in with this OpenID Connect issuer
    /// (e.g. https://accounts.google.com). Register `<--url>/oidc/callback`
    /// as the redirect URL there.
    #[arg(long, value_name = "URL", requires_all = ["oidc_client_id", "oidc_client_secret_file"])]
    pub(crate) oidc_issuer: Option<String>,
    /// The client id the provider gave this server.
    #[arg(long, value_name = "ID", requires = "oidc_issuer")]
    pub(crate) oidc_client_id: Option<String>,
    /// File holding the client secret (mode 0600).
    #[arg(long, value_name = "FILE", requires = "oidc_issuer")]
    pub(crate) oidc_client_secret_file: Option<std::path::PathBuf>,
    /// Only emails in these domains may sign in (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "DOMAIN,...", requires = "oidc_issuer")]
    pub(crate) oidc_allowed_domains: Vec<String>,
    /// Only these emails may sign in (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "EMAIL,...", requires = "oidc_issuer")]
    pub(crate) oidc_allowed_users: Vec<String>,
    /// Only members of one of these provider groups may sign in (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "GROUP,...", requires = "oidc_issuer")]
    pub(crate) oidc_allowed_groups: Vec<String>,
    /// The ID token claim that lists the user's groups [default: groups].
    #[arg(long, value_name = "CLAIM", requires = "oidc_issuer")]
    pub(crate) oidc_groups_claim: Option<String>,
    /// Scopes to ask for besides openid (comma-separated) [default: email,profile,groups].
    #[arg(long, value_delimiter = ',', value_name = "SCOPE,...", requires = "oidc_issuer")]
    pub(crate) oidc_scopes: Vec<String>,
}

impl OidcArgs {
    /// Is sign-in asked for at all?
    pub(crate) fn any_set(&self) -> bool {
        self.oidc_issuer.is_some()
    }

    /// The configuration, reading the secret file; `None` without `--oidc-issuer`.
    pub(crate) fn config(&self) -> Result<Option<OidcConfig>, OidcError> {
        let (Some(issuer), Some(id), Some(file)) = (&self.oidc_issuer, &self.oidc_client_id, &self.oidc_client_secret_file) else {
            return Ok(None);
        };
        use std::os::unix::fs::MetadataExt;
        let f = file.display();
        let meta = std::fs::metadata(file).map_err(|e| OidcError::Config(format!("--oidc-client-secret-file {f}: {e}")))?;
        if meta.mode() & 0o077 != 0 {
            return Err(OidcError::Config(format!(
                "--oidc-client-secret-file {f} is readable by others (mode {:o}); run `chmod 600 {f}`",
                meta.mode() & 0o777
            )));
        }
        let secret = std::fs::read_to_string(file).map_err(|e| OidcError::Config(format!("--oidc-client-secret-file {f}: {e}")))?;
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(OidcError::Config(format!("--oidc-client-secret-file {f} is empty")));
        }
        let mut c = OidcConfig::new(issuer, id, secret);
        let clean = |v: &[String]| v.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect::<Vec<_>>();
        c.allowed_domains = clean(&self.oidc_allowed_domains).into_iter().map(|d| d.trim_start_matches('@').to_ascii_lowercase()).collect();
        c.allowed_users = clean(&self.oidc_allowed_users).into_iter().map(|u| u.to_ascii_lowercase()).collect();
        c.allowed_groups = clean(&self.oidc_allowed_groups);
        if let Some(g) = &self.oidc_groups_claim {
            c.groups_claim = g.clone();
        }
        if !self.oidc_scopes.is_empty() {
            c.scopes = clean(&self.oidc_scopes).into_iter().filter(|s| s != "openid").collect();
        }
        Ok(Some(c))
    }
}

/// Who signed in, as the verified ID token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SignedIn {
    /// Lowercased email: the tailnet user name.
    pub(crate) email: String,
    /// The user's groups from the `--oidc-groups-claim` claim (at most 1024).
    pub(crate) groups: Vec<String>,
}

/// Why a sign-in (or the provider's setup) failed. Each message is what the
/// person signing in (on the device or in the browser) or the admin reads,
/// and says what to do; [`OidcError::http_status`] is the page's status.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum OidcError {
    /// Discovery failed when the server started.
    #[error("cannot reach the identity provider at {issuer}: {message} (check --oidc-issuer and that the provider is up)")]
    Unreachable { issuer: String, message: String },
    /// A `--oidc-*` setting, the secret file or the redirect URL is wrong.
    #[error("identity provider configuration: {0}")]
    Config(String),
    /// The provider's signing keys could not be fetched.
    #[error("the identity provider at {issuer} cannot be reached (fetching its keys: {message})")]
    KeysUnreachable { issuer: String, message: String },
    /// [`MAX_PENDING`] sign-ins are waiting already.
    #[error("too many sign-ins in progress on this control server; try again in a few minutes")]
    TooManySignIns,
    /// `/oidc/start/<login>` names no sign-in in flight.
    #[error("this sign-in link is unknown or has expired; run `tailgate up` again on the device for a new sign-in URL")]
    UnknownLink,
    /// `/oidc/start/<login>` was opened before.
    #[error("this sign-in link was already used; run `tailgate up` again on the device for a new sign-in URL")]
    LinkUsed,
    /// The callback carries no `state`.
    #[error("the sign-in callback has no state; run `tailgate up` again on the device for a new sign-in URL")]
    NoState,
    /// The callback's `state` names no flow: replayed, forged or expired.
    #[error(
        "unknown or already used sign-in state (a replayed or expired callback); run `tailgate up` again on the device for a new sign-in URL"
    )]
    UnknownState,
    /// The person signed in (as this email) after the device stopped waiting.
    #[error("signed in as {0}, but the device stopped waiting; run `tailgate up` again on the device for a new sign-in URL")]
    DeviceGone(String),
    /// The provider redirected back with `error` (and maybe a description).
    #[error("the identity provider refused the sign-in: {error}{}", description.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    ProviderRefused { error: String, description: Option<String> },
    /// The callback carries neither `error` nor `code`.
    #[error("the sign-in callback has no authorization code")]
    NoCode,
    /// The token endpoint refused the code.
    #[error("the identity provider did not accept the authorization code (used already, expired, or the provider is down): {0}")]
    CodeRejected(String),
    /// The token response has no ID token.
    #[error("the identity provider sent no ID token (is the `openid` scope allowed?)")]
    NoIdToken,
    /// The ID token failed a check (signature, issuer, audience, expiry,
    /// nonce); `hint` names the likely misconfiguration.
    #[error("the identity provider's ID token was refused: {reason}{hint}")]
    TokenRefused { reason: String, hint: &'static str },
    /// The ID token names no email, so there is no user name.
    #[error("the ID token has no email claim; ask for the `email` scope (--oidc-scopes) or map an email claim at the provider")]
    NoEmail,
    /// The provider says the email is not verified.
    #[error("the identity provider says {0} is not verified; verify it there first")]
    EmailUnverified(String),
    /// `--oidc-allowed-domains` does not list the email's domain.
    #[error("{email} may not join this tailnet: its domain is not one of the allowed domains ({allowed}); ask an admin")]
    DomainNotAllowed { email: String, allowed: String },
    /// `--oidc-allowed-users` does not list the email.
    #[error("{0} may not join this tailnet: not in the allowed users; ask an admin")]
    UserNotAllowed(String),
    /// The user is in none of `--oidc-allowed-groups`.
    #[error("{email} may not join this tailnet: in none of the allowed groups ({allowed}); ask an admin")]
    GroupNotAllowed { email: String, allowed: String },
}

impl OidcError {
    /// The HTTP status of the page that shows this error in the browser.
    pub(crate) fn http_status(&self) -> u16 {
        use OidcError::*;
        match self {
            UnknownLink => 404,
            LinkUsed | DeviceGone(_) => 410,
            NoState | UnknownState => 400,
            Unreachable { .. } | KeysUnreachable { .. } | TooManySignIns => 503,
            Config(_) => 500,
            ProviderRefused { .. }
            | NoCode
            | CodeRejected(_)
            | NoIdToken
            | TokenRefused { .. }
            | NoEmail
            | EmailUnverified(_)
            | DomainNotAllowed { .. }
            | UserNotAllowed(_)
            | GroupNotAllowed { .. } => 403,
        }
    }
}

/// Every claim we did not ask the crate to type, so the groups claim can be
/// any name (`--oidc-groups-claim`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct OtherClaims(serde_json::Map<String, serde_json::Value>);
impl AdditionalClaims for OtherClaims {}

type IdFields =
    IdTokenFields<OtherClaims, EmptyExtraTokenFields, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;
type Tokens = StandardTokenResponse<IdFields, CoreTokenType>;
/// The `openidconnect` client for our claim types (only the token endpoint set).
pub(crate) type OClient = openidconnect::Client<
    OtherClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    Tokens,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// Sign-ins in flight are capped: a login costs a node only a Noise
/// handshake, so this bounds the memory anyone can make the server hold.
const MAX_PENDING: usize = 4096;

/// What the waiting node gets: who signed in, or why not (for the person).
pub(crate) type Outcome = Result<SignedIn, OidcError>;

struct Login {
    created: Instant,
    started: bool,
    done: Option<oneshot::Sender<Outcome>>,
}

struct Flow {
    login: String,
    verifier: PkceCodeVerifier,
    nonce: Nonce,
    created: Instant,
}

#[derive(Default)]
struct Pending {
    logins: HashMap<String, Login>,
    flows: HashMap<String, Flow>,
}

/// The sign-ins in flight and the provider's client (see the module docs).
pub(crate) struct Oidc {
    cfg: OidcConfig,
    http: openidconnect::ureq::Agent,
    meta: CoreProviderMetadata,
    client: RwLock<OClient>,
    public_url: String,
    pending: Mutex<Pending>,
}

fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

fn random_id() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

impl Oidc {
    /// Reads the provider's discovery document and keys (blocking). An
    /// unreachable provider is an error after `http_timeout`, not a hang.
    pub(crate) fn discover(cfg: OidcConfig, public_url: &str) -> Result<Oidc, OidcError> {
        let http = openidconnect::ureq::AgentBuilder::new()
            .timeout_connect(cfg.http_timeout)
            .timeout(cfg.http_timeout)
            // Following redirects from the provider's endpoints invites SSRF.
            .redirects(0)
            .build();
        let issuer = IssuerUrl::new(cfg.issuer.clone()).map_err(|e| OidcError::Config(format!("--oidc-issuer {:?}: {e}", cfg.issuer)))?;
        let meta = CoreProviderMetadata::discover(&issuer, &http)
            .map_err(|e| OidcError::Unreachable { issuer: cfg.issuer.clone(), message: describe(&e) })?;
        let public_url = public_url.trim_end_matches('/').to_string();
        let client = build_client(&cfg, &meta, &public_url)?;
        Ok(Oidc { cfg, http, meta, client: RwLock::new(client), public_url, pending: Mutex::new(Pending::default()) })
    }

    /// How long a sign-in URL (and the wait for it) lasts.
    pub(crate) fn login_ttl(&self) -> Duration {
        self.cfg.login_ttl
    }

    /// The issuer URL (`--oidc-issuer`).
    pub(crate) fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    /// The redirect URL to register with the provider.
    pub(crate) fn redirect_url(&self) -> String {
        format!("{}/oidc/callback", self.public_url)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Nothing panics under this lock; recovering keeps sign-ins working.
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let ttl = self.cfg.login_ttl;
        p.logins.retain(|_, l| l.created.elapsed() < ttl);
        p.flows.retain(|_, f| f.created.elapsed() < ttl);
        p
    }

    /// A new sign-in for a waiting node: its URL and where the outcome arrives.
    pub(crate) fn new_login(&self) -> Result<(String, String, oneshot::Receiver<Outcome>), OidcError> {
        let mut p = self.lock();
        if p.logins.len() >= MAX_PENDING {
            return Err(OidcError::TooManySignIns);
        }
        let id = random_id();
        let (tx, rx) = oneshot::channel();
        p.logins.insert(id.clone(), Login { created: Instant::now(), started: false, done: Some(tx) });
        Ok((id.clone(), format!("{}/oidc/start/{id}", self.public_url), rx))
    }

    /// The node stopped waiting (disconnected or timed out).
    pub(crate) fn cancel(&self, login: &str) {
        let mut p = self.lock();
        p.logins.remove(login);
        p.flows.retain(|_, f| f.login != login);
    }

    /// `GET /oidc/start/<login>`: the provider's authorization URL, once.
    pub(crate) fn start(&self, login: &str) -> Result<String, OidcError> {
        let mut p = self.lock();
        let Some(l) = p.logins.get_mut(login) else {
            return Err(OidcError::UnknownLink);
        };
        if l.started {
            return Err(OidcError::LinkUsed);
        }
        l.started = true;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let client = self.client.read().unwrap_or_else(|e| e.into_inner());
        let mut req = client.authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random);
        for s in &self.cfg.scopes {
            req = req.add_scope(Scope::new(s.clone()));
        }
        let (url, state, nonce) = req.set_pkce_challenge(challenge).url();
        drop(client);
        p.flows.insert(state.secret().clone(), Flow { login: login.into(), verifier, nonce, created: Instant::now() });
        Ok(url.to_string())
    }

    /// `GET /oidc/callback?...` (blocking): finishes the flow named by
    /// `state`, tells the waiting node, and returns the user's email.
    pub(crate) fn callback(&self, query: &str) -> Result<String, OidcError> {
        let params: HashMap<String, String> = openidconnect::url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let Some(state) = params.get("state") else {
            return Err(OidcError::NoState);
        };
        let Some(flow) = self.lock().flows.remove(state) else {
            return Err(OidcError::UnknownState);
        };
        let outcome = self.finish(flow.verifier, &flow.nonce, &params);
        let done = self.lock().logins.remove(&flow.login).and_then(|mut l| l.done.take());
        match (outcome, done) {
            (Ok(who), Some(tx)) => {
                let email = who.email.clone();
                if tx.send(Ok(who)).is_err() {
                    return Err(OidcError::DeviceGone(email));
                }
                Ok(email)
            }
            (Ok(who), None) => Err(OidcError::DeviceGone(who.email)),
            (Err(e), tx) => {
                if let Some(tx) = tx {
                    let _ = tx.send(Err(e.clone()));
                }
                Err(e)
            }
        }
    }

    fn finish(&self, verifier: PkceCodeVerifier, nonce: &Nonce, params: &HashMap<String, String>) -> Outcome {
        if let Some(err) = params.get("error") {
            return Err(OidcError::ProviderRefused { error: err.clone(), description: params.get("error_description").cloned() });
        }
        let code = params.get("code").ok_or(OidcError::NoCode)?;
        let client = self.client.read().unwrap_or_else(|e| e.into_inner()).clone();
        let tokens = client
            .exchange_code(AuthorizationCode::new(code.clone()))
            .map_err(|e| OidcError::Config(e.to_string()))?
            .set_pkce_verifier(verifier)
            .request(&self.http)
            .map_err(|e| OidcError::CodeRejected(describe(&e)))?;
        let id_token = tokens.id_token().ok_or(OidcError::NoIdToken)?;
        let claims = match id_token.claims(&client.id_token_verifier(), nonce) {
            Ok(c) => c.clone(),
            Err(ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoMatchingKey)) => {
                // Key rotation: fetch the provider's keys again, once.
                let fresh = self.refresh_keys()?;
                id_token.claims(&fresh.id_token_verifier(), nonce).map_err(|e| refused_token(&e))?.clone()
            }
            Err(e) => return Err(refused_token(&e)),
        };
        let email = claims.email().map(|e| e.as_str().trim().to_ascii_lowercase()).filter(|e| !e.is_empty()).ok_or(OidcError::NoEmail)?;
        if claims.email_verified() == Some(false) {
            return Err(OidcError::EmailUnverified(email));
        }
        let groups = groups_of(claims.additional_claims(), &self.cfg.groups_claim);
        self.allowed(&email, &groups)?;
        Ok(SignedIn { email, groups })
    }

    /// Is `login` a sign-in in flight?
    pub(crate) fn is_login(&self, login: &str) -> bool {
        self.lock().logins.contains_key(login)
    }

    /// Fetches the provider's signing keys again (blocking).
    pub(crate) fn refresh_keys(&self) -> Result<OClient, OidcError> {
        let jwks = JsonWebKeySet::fetch(self.meta.jwks_uri(), &self.http)
            .map_err(|e| OidcError::KeysUnreachable { issuer: self.cfg.issuer.clone(), message: describe(&e) })?;
        let meta = self.meta.clone().set_jwks(jwks);
        let client = build_client(&self.cfg, &meta, &self.public_url)?;
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client.clone();
        Ok(client)
    }

    /// The server's allow-lists; each one that is set must admit the user.
    fn allowed(&self, email: &str, groups: &[String]) -> Result<(), OidcError> {
        let c = &self.cfg;
        let domain = email.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        if !c.allowed_domains.is_empty() && !c.allowed_domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) {
            return Err(OidcError::DomainNotAllowed { email: email.into(), allowed: c.allowed_domains.join(", ") });
        }
        if !c.allowed_users.is_empty() && !c.allowed_users.iter().any(|u| u.eq_ignore_ascii_case(email)) {
            return Err(OidcError::UserNotAllowed(email.into()));
        }
        if !c.allowed_groups.is_empty() && !groups.iter().any(|g| c.allowed_groups.contains(g)) {
            return Err(OidcError::GroupNotAllowed { email: email.into(), allowed: c.allowed_groups.join(", ") });
        }
        Ok(())
    }
}

fn refused_token(e: &ClaimsVerificationError) -> OidcError {
    let hint = match e {
        ClaimsVerificationError::InvalidAudience(_) => " (the token was issued to another client than --oidc-client-id)",
        ClaimsVerificationError::SignatureVerification(_) => " (it is not signed by the provider's published keys)",
        ClaimsVerificationError::Expired(_) => " (check the clocks of this server and the provider)",
        ClaimsVerificationError::InvalidIssuer(_) => " (it comes from another issuer than --oidc-issuer)",
        _ => "",
    };
    OidcError::TokenRefused { reason: describe(e), hint }
}

fn build_client(cfg: &OidcConfig, meta: &CoreProviderMetadata, public_url: &str) -> Result<OClient, OidcError> {
    let redirect = RedirectUrl::new(format!("{public_url}/oidc/callback"))
        .map_err(|e| OidcError::Config(format!("redirect URL from the server URL {public_url:?}: {e}")))?;
    Ok(OClient::from_provider_metadata(
        meta.clone(),
        ClientId::new(cfg.client_id.clone()),
        Some(ClientSecret::new(cfg.client_secret.clone())),
    )
    .set_redirect_uri(redirect))
}

/// The groups claim: a list of strings or one string; anything else is no
/// groups (a provider that sends objects needs a mapper on its side).
fn groups_of(claims: &OtherClaims, name: &str) -> Vec<String> {
    const MAX_GROUPS: usize = 1024;
    let ok = |s: &str| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control);
    match claims.0.get(name) {
        Some(serde_json::Value::Array(v)) => {
            v.iter().filter_map(|g| g.as_str()).filter(|g| ok(g)).take(MAX_GROUPS).map(String::from).collect()
        }
        Some(serde_json::Value::String(s)) if ok(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_claim_shapes() {
        let c: OtherClaims = serde_json::from_str(r#"{"groups":["admins","dev",7,""],"role":"ops","bad":{"x":1}}"#).unwrap();
        assert_eq!(groups_of(&c, "groups"), vec!["admins".to_string(), "dev".to_string()]);
        assert_eq!(groups_of(&c, "role"), vec!["ops".to_string()]);
        assert!(groups_of(&c, "bad").is_empty());
        assert!(groups_of(&c, "missing").is_empty());
    }
}
