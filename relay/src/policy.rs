//! Who may do what: the per-client rules of the config file's
//! `[clients.NAME]` tables and the `[unlisted_clients]` table that applies
//! to every client without one.
//!
//! A rule that is not set does not restrict: a client with an empty table
//! may call every path and model without limits. The unlisted table works
//! the same way, and without it unlisted clients are unrestricted too.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use http::StatusCode;
use passage_shared::error_body::ApiError;
use serde::Deserialize;

/// The rules of one client (or of all unlisted clients), as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRules {
    /// Path prefixes the client may call (`/v1/chat/` or `/v1/models`); unset: all.
    pub allow_paths: Option<Vec<String>>,
    /// Models the client may ask for (exact, or a prefix ending in `*`); unset: all.
    pub allow_models: Option<Vec<String>>,
    /// Requests admitted per minute.
    pub requests_per_minute: Option<NonZeroU32>,
    /// Requests in flight at once.
    pub concurrent_requests: Option<NonZeroU32>,
    /// Tokens (prompt + completion, as the upstream reports them) per rolling minute.
    pub tokens_per_minute: Option<u64>,
    /// Tokens per rolling 24 hours.
    pub tokens_per_day: Option<u64>,
    /// The response cache: `true` (every cacheable request unless it says
    /// `x-passage-cache: skip`) or `"opt-in"` (only those that say `use`);
    /// unset or `false`: off.
    pub cache: Option<CacheSetting>,
    /// Seconds an answer stays in the cache (default 3600).
    pub cache_ttl_seconds: Option<NonZeroU32>,
    /// Largest answer kept, in KiB (default 1024).
    pub cache_max_entry_kib: Option<NonZeroU32>,
    /// Clients naming the same scope share cached answers (default: each
    /// client its own).
    pub cache_scope: Option<String>,
}

/// The `cache` rule as written: a switch, or the word `opt-in`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum CacheSetting {
    /// `true`: on for every cacheable request; `false`: off.
    Switch(bool),
    /// `"opt-in"`: only for requests that ask with `x-passage-cache: use`.
    Word(String),
}

/// When a client's requests use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// Never.
    Off,
    /// Unless the request says `skip`.
    Default,
    /// Only when the request says `use`.
    OptIn,
}

/// The policy tables of a config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PolicyTables {
    /// One table per client, by the name in its certificate.
    #[serde(default)]
    pub clients: HashMap<String, ClientRules>,
    /// Rules for every client without a table of its own.
    pub unlisted_clients: Option<ClientRules>,
}

/// The keys of a config file that hold policy tables rather than flags.
pub const POLICY_SECTIONS: [&str; 2] = ["clients", "unlisted_clients"];

/// Why a policy table was refused.
#[derive(Debug, thiserror::Error)]
#[error("`{rule}`: {message}")]
pub struct PolicyError {
    /// The key, e.g. `clients.alice.allow_paths`.
    pub rule: String,
    /// What is wrong with it.
    pub message: String,
}

/// The rules in force for one client, with the table they came from.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The rules.
    pub rules: Arc<ClientRules>,
    /// Where they came from (`clients.NAME` or `unlisted_clients`), named in refusals.
    pub source: Arc<str>,
}

/// The checked policy a relay enforces; replaced whole on reload.
#[derive(Debug, Clone)]
pub struct Policy {
    clients: HashMap<String, Applied>,
    unlisted: Applied,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            clients: HashMap::new(),
            unlisted: Applied {
                rules: Arc::default(),
                source: "unlisted_clients".into(),
            },
        }
    }
}

impl Policy {
    /// Checks the tables: path prefixes start with `/`, model patterns are
    /// not empty, token limits are not zero, client names are names.
    pub fn new(tables: PolicyTables) -> Result<Policy, PolicyError> {
        let mut clients = HashMap::new();
        for (name, rules) in tables.clients {
            if !passage_shared::pki::is_valid_client_name(&name) {
                return Err(PolicyError {
                    rule: format!("clients.{name}"),
                    message: "not a client name (letters, digits, '.', '_', '-')".into(),
                });
            }
            let source = format!("clients.{name}");
            check_rules(&source, &rules)?;
            let applied = Applied {
                rules: Arc::new(rules),
                source: source.into(),
            };
            clients.insert(name, applied);
        }
        let unlisted = tables.unlisted_clients.unwrap_or_default();
        check_rules("unlisted_clients", &unlisted)?;
        Ok(Policy {
            clients,
            unlisted: Applied {
                rules: Arc::new(unlisted),
                source: "unlisted_clients".into(),
            },
        })
    }

    /// The rules for `client`: its own table, else the unlisted clients'.
    pub fn rules_for(&self, client: &str) -> Applied {
        self.clients.get(client).unwrap_or(&self.unlisted).clone()
    }
}

impl ClientRules {
    /// Whether any rate limit is set (requests, concurrency or tokens).
    pub fn has_limits(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.concurrent_requests.is_some()
            || self.tokens_per_minute.is_some()
            || self.tokens_per_day.is_some()
    }
}

fn check_rules(table: &str, rules: &ClientRules) -> Result<(), PolicyError> {
    let refuse = |key: &str, message: &str| PolicyError {
        rule: format!("{table}.{key}"),
        message: message.into(),
    };
    for prefix in rules.allow_paths.iter().flatten() {
        if !prefix.starts_with('/') {
            return Err(refuse("allow_paths", "each prefix must start with '/'"));
        }
    }
    for pattern in rules.allow_models.iter().flatten() {
        if pattern.is_empty() || pattern.strip_suffix('*').unwrap_or(pattern).contains('*') {
            return Err(refuse(
                "allow_models",
                "each model must be a name, or a prefix followed by one '*' at the end",
            ));
        }
    }
    if rules.tokens_per_minute == Some(0) {
        return Err(refuse("tokens_per_minute", "must be at least 1"));
    }
    if rules.tokens_per_day == Some(0) {
        return Err(refuse("tokens_per_day", "must be at least 1"));
    }
    if let Some(CacheSetting::Word(word)) = &rules.cache
        && word != "opt-in"
    {
        return Err(refuse("cache", "must be true, false or \"opt-in\""));
    }
    if let Some(scope) = &rules.cache_scope
        && !passage_shared::pki::is_valid_client_name(scope)
    {
        return Err(refuse(
            "cache_scope",
            "must be a name (letters, digits, '.', '_', '-')",
        ));
    }
    Ok(())
}

impl ClientRules {
    /// When the client's requests use the cache.
    pub fn cache_use(&self) -> CacheUse {
        match &self.cache {
            Some(CacheSetting::Switch(true)) => CacheUse::Default,
            Some(CacheSetting::Word(_)) => CacheUse::OptIn,
            _ => CacheUse::Off,
        }
    }
}

impl Applied {
    /// Whether the rules allow `path` (without the query); 403 naming the rule if not.
    pub fn check_path(&self, client: &str, path: &str) -> Result<(), ApiError> {
        let Some(prefixes) = &self.rules.allow_paths else {
            return Ok(());
        };
        if prefixes.iter().any(|prefix| path_has_prefix(path, prefix)) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "path_not_allowed",
            format!(
                "client '{client}' may not call {path}: rule {}.allow_paths allows {}",
                self.source,
                listed(prefixes)
            ),
        ))
    }

    /// Whether the rules restrict models (the relay must then find the model).
    pub fn restricts_models(&self) -> bool {
        self.rules.allow_models.is_some()
    }

    /// Whether the rules allow `model` (None: no model could be found in the
    /// body); 403 naming the rule if not.
    pub fn check_model(&self, client: &str, model: Option<&str>) -> Result<(), ApiError> {
        let Some(patterns) = &self.rules.allow_models else {
            return Ok(());
        };
        let allowed = model.is_some_and(|model| {
            patterns
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => model.starts_with(prefix),
                    None => model == pattern,
                })
        });
        if allowed {
            return Ok(());
        }
        let asked = match model {
            Some(model) => format!("model '{model}'"),
            None => "a request whose model cannot be read from its body".to_owned(),
        };
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!(
                "client '{client}' may not use {asked}: rule {}.allow_models allows {}",
                self.source,
                listed(patterns)
            ),
        ))
    }
}

/// Whether `prefix` covers `path` at a segment boundary: `/v1/chat` covers
/// `/v1/chat` and `/v1/chat/completions` but not `/v1/chatter`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

fn listed(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".to_owned()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_text: &str) -> Result<Policy, PolicyError> {
        let tables: PolicyTables = toml::from_str(toml_text).expect("toml");
        Policy::new(tables)
    }

    #[test]
    fn listed_clients_get_their_table_and_others_the_unlisted_one() {
        let policy = policy(
            "[clients.alice]\nallow_paths = [\"/v1/chat\"]\n[unlisted_clients]\nallow_paths = []\n",
        )
        .expect("valid");
        let alice = policy.rules_for("alice");
        assert!(alice.check_path("alice", "/v1/chat/completions").is_ok());
        assert!(alice.check_path("alice", "/v1/chat").is_ok());
        let refused = alice
            .check_path("alice", "/v1/chatter")
            .expect_err("not a segment");
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(
            refused.message.contains("rule clients.alice.allow_paths"),
            "{}",
            refused.message
        );
        let bob = policy.rules_for("bob");
        let refused = bob.check_path("bob", "/v1/models").expect_err("deny all");
        assert!(
            refused
                .message
                .contains("unlisted_clients.allow_paths allows nothing")
        );
    }

    #[test]
    fn no_tables_means_no_restriction() {
        let policy = Policy::default();
        let rules = policy.rules_for("anyone");
        assert!(rules.check_path("anyone", "/anything").is_ok());
        assert!(!rules.restricts_models());
        assert!(rules.check_model("anyone", None).is_ok());
    }

    #[test]
    fn models_match_exactly_or_by_prefix() {
        let policy =
            policy("[clients.a]\nallow_models = [\"gpt-4o-mini\", \"o3*\"]\n").expect("valid");
        let rules = policy.rules_for("a");
        assert!(rules.check_model("a", Some("gpt-4o-mini")).is_ok());
        assert!(rules.check_model("a", Some("o3-pro")).is_ok());
        assert!(rules.check_model("a", Some("gpt-4o")).is_err());
        let unknown = rules.check_model("a", None).expect_err("fail closed");
        assert_eq!(unknown.code, "model_not_allowed");
    }

    #[test]
    fn bad_tables_name_the_key() {
        let error = policy("[clients.a]\nallow_paths = [\"v1\"]\n").expect_err("refused");
        assert_eq!(error.rule, "clients.a.allow_paths");
        let error = policy("[unlisted_clients]\nallow_models = [\"a*b\"]\n").expect_err("refused");
        assert_eq!(error.rule, "unlisted_clients.allow_models");
        let error = policy("[clients.\"a b\"]\n").expect_err("refused");
        assert_eq!(error.rule, "clients.a b");
        let error = policy("[clients.a]\nallow_models = [\"gpt-ü\", \"*\"]\n").map(|_| ());
        assert!(error.is_ok(), "a multi-byte name and a lone '*' are fine");
        let error = policy("[clients.a]\ntokens_per_day = 0\n").expect_err("refused");
        assert_eq!(error.rule, "clients.a.tokens_per_day");
        assert!(toml::from_str::<PolicyTables>("[clients.a]\nallow_path = []\n").is_err());
    }
}
