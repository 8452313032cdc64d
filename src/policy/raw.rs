//! The policy file as TOML gives it to us, with byte spans for diagnostics.
//! Every table denies unknown keys so typos are errors, not silent no-ops.
#![warn(missing_docs)]

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub(crate) type SStr = Spanned<String>;
pub(crate) type SList = Spanned<Vec<SStr>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    #[serde(default)]
    pub groups: BTreeMap<SStr, Vec<SStr>>,
    #[serde(default)]
    pub tag_owners: BTreeMap<SStr, Vec<SStr>>,
    #[serde(default)]
    pub hosts: BTreeMap<SStr, SStr>,
    /// `None` when the file has no `acl` key at all (see README: only the
    /// SSH port implied by `[[ssh]]` rules is reachable then).
    #[serde(default)]
    pub acl: Option<Vec<Spanned<RawAcl>>>,
    #[serde(default)]
    pub ssh: Vec<Spanned<RawSsh>>,
    #[serde(default)]
    pub tests: Vec<Spanned<RawTest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAcl {
    #[serde(default)]
    pub action: Option<SStr>,
    pub src: SList,
    pub dst: SList,
}

/// `record = true | false | "required"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawRecord {
    Bool(bool),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSsh {
    pub action: SStr,
    pub src: SList,
    pub dst: SList,
    pub users: SList,
    #[serde(default)]
    pub record: Option<Spanned<RawRecord>>,
    #[serde(default)]
    pub max_duration: Option<SStr>,
    #[serde(default)]
    pub accept_env: Option<SList>,
    /// `check` rules: how long an approval lasts (`"12h"`) or `"always"`.
    #[serde(default)]
    pub check_period: Option<SStr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTest {
    pub src: SStr,
    #[serde(default)]
    pub src_ip: Option<SStr>,
    pub dst: SStr,
    #[serde(default)]
    pub dst_tags: Option<SList>,
    /// The caller's groups at the identity provider (matched by `group:oidc/NAME`).
    #[serde(default)]
    pub src_groups: Option<SList>,
    #[serde(default)]
    pub accept: Vec<SStr>,
    #[serde(default)]
    pub check: Vec<SStr>,
    #[serde(default)]
    pub deny: Vec<SStr>,
    #[serde(default)]
    pub reach: Vec<Spanned<i64>>,
    #[serde(default)]
    pub no_reach: Vec<Spanned<i64>>,
}
