use super::*;

const VALID: &str = r#"
[edge]
listen = ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]
allow = ["127.0.0.0/8"]

[core_side]
listen = ["udp:127.0.0.1:5070"]

[sip]
t1 = "100ms"

[[trunk]]
name = "org-a"
match = { source = ["127.0.0.2"] }
edge = "udp:127.0.0.2:5080"
core = "udp:127.0.0.1:5090"

[[trunk]]
name = "org-b"
edge = "tcp:127.0.0.3:5080"
core = "udp:core.example:5090"
"#;

fn problems(text: &str) -> Vec<Problem> {
    Config::from_toml(text, "test.toml")
        .unwrap()
        .validate()
        .unwrap_err()
}

fn keys(problems: &[Problem]) -> Vec<&str> {
    problems
        .iter()
        .map(|problem| problem.key.as_str())
        .collect()
}

#[test]
fn valid_config_gives_typed_settings_with_defaults() {
    let settings = Config::from_toml(VALID, "test.toml")
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(settings.timers.t1, Duration::from_millis(100));
    assert_eq!(settings.timers.t2, Duration::from_secs(4));
    assert_eq!(settings.edge.listen.len(), 2);
    assert_eq!(settings.trunks.len(), 2);
    assert_eq!(
        settings.trunks[0].sources,
        vec!["127.0.0.2/32".parse::<IpNet>().unwrap()]
    );
    assert_eq!(settings.trunks[1].core.host, "core.example");
    assert_eq!(settings.limits.max_message_size, 65_535);
    assert_eq!(settings.log.format, "text");
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    let text = VALID.replace("[sip]\n", "[sip]\nt3 = \"1s\"\n");
    let error = Config::from_toml(&text, "test.toml")
        .unwrap_err()
        .to_string();
    assert!(error.contains("t3"), "{error}");
    let text = VALID.replace("name = \"org-a\"", "name = \"org-a\"\ncolour = \"red\"");
    let error = Config::from_toml(&text, "test.toml")
        .unwrap_err()
        .to_string();
    assert!(error.contains("colour"), "{error}");
}

#[test]
fn every_problem_is_reported_at_once_naming_key_and_trunk() {
    let text = VALID
        .replace(
            "t1 = \"100ms\"",
            "t1 = \"100\"\nt2 = \"forever\"\nmax_message_size = 10",
        )
        .replace(
            "edge = \"udp:127.0.0.2:5080\"",
            "edge = \"udp:127.0.0.2:port\"",
        )
        .replace(
            "core = \"udp:core.example:5090\"",
            "core = \"tcp:core.example:5090\"",
        )
        .replace("allow = [\"127.0.0.0/8\"]", "allow = [\"127.0.0.0/33\"]");
    let found = problems(&text);
    let keys = keys(&found);
    for expected in [
        "sip.t1",
        "sip.t2",
        "sip.max_message_size",
        "trunk \"org-a\".edge",
        "trunk \"org-b\".core",
        "edge.allow",
    ] {
        assert!(
            keys.contains(&expected),
            "{expected} missing from {found:?}"
        );
    }
    let core = found
        .iter()
        .find(|p| p.key == "trunk \"org-b\".core")
        .unwrap();
    assert!(
        core.message
            .contains("core_side.listen has no tcp listener"),
        "{core}"
    );
}

#[test]
fn timers_are_bounded() {
    let text = VALID.replace(
        "t1 = \"100ms\"",
        "t1 = \"0ms\"\nt4 = \"2h\"\ntimer_c = \"0s\"",
    );
    let found = problems(&text);
    assert_eq!(
        keys(&found),
        vec!["sip.t1", "sip.t4", "sip.timer_c"],
        "{found:?}"
    );
}

#[test]
fn unspecified_listener_needs_advertise() {
    let text = VALID.replace("udp:127.0.0.1:5070", "udp:0.0.0.0:5070");
    assert_eq!(keys(&problems(&text)), vec!["core_side.advertise"]);
    let fixed = text.replace("[core_side]\n", "[core_side]\nadvertise = \"192.0.2.10\"\n");
    assert!(Config::from_toml(&fixed, "t").unwrap().validate().is_ok());
}

#[test]
fn sides_cannot_share_a_socket() {
    let text = VALID.replace("udp:127.0.0.1:5070", "udp:127.0.0.1:5060");
    assert_eq!(keys(&problems(&text)), vec!["core_side.listen"]);
    // Port 0 lets the system pick: both sides may ask for it.
    let text = VALID
        .replace("udp:127.0.0.1:5070", "udp:127.0.0.1:0")
        .replace("udp:127.0.0.1:5060", "udp:127.0.0.1:0");
    assert!(Config::from_toml(&text, "t").unwrap().validate().is_ok());
}

#[test]
fn trunk_rules() {
    let text = VALID.replace("name = \"org-b\"", "name = \"org-a\"");
    assert!(keys(&problems(&text)).contains(&"trunk \"org-a\".name"));
    // A catch-all trunk before another one hides it.
    let text = VALID.replace("match = { source = [\"127.0.0.2\"] }\n", "");
    assert_eq!(keys(&problems(&text)), vec!["trunk \"org-a\".match"]);
    let text = VALID.split("[[trunk]]").next().unwrap().to_string();
    assert_eq!(keys(&problems(&text)), vec!["trunk"]);
}

#[test]
fn log_settings_are_checked() {
    let text = format!("{VALID}\n[log]\nformat = \"xml\"\nlevel = \"info,,=[\"\n");
    let found = problems(&text);
    assert!(keys(&found).contains(&"log.format"), "{found:?}");
}

#[test]
fn example_config_is_valid() {
    let text = include_str!("../../config/sidecar.toml");
    let settings = Config::from_toml(text, "config/sidecar.toml")
        .unwrap()
        .validate();
    assert!(settings.is_ok(), "{:?}", settings.err());
}

fn with_credentials(table: &str) -> String {
    VALID.replacen(
        "core = \"udp:127.0.0.1:5090\"\n",
        &format!("core = \"udp:127.0.0.1:5090\"\n\n[trunk.credentials]\n{table}\n"),
        1,
    )
}

#[test]
fn oauth2_credentials_validate_and_read_the_secret_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret_path = dir.path().join("secret");
    std::fs::write(&secret_path, "  s3cret-from-file-91aa\n").unwrap();
    let text = with_credentials(&format!(
        "kind = \"oauth2\"\ntoken_url = \"https://login.example.com/oauth/token\"\nclient_id = \"edge-a\"\n\
         client_secret_file = \"{}\"\nscopes = [\"trunk:write\"]\norganization = \"org-a\"\nrefresh_buffer = \"20s\"\n\
         extra_params = {{ audience = \"sip\" }}",
        secret_path.display()
    ));
    let settings = Config::from_toml(&text, "t").unwrap().validate().unwrap();
    let credentials = settings.trunks[0].credentials.as_ref().unwrap();
    assert_eq!(credentials.policy.refresh_buffer, Duration::from_secs(20));
    assert_eq!(credentials.organization.as_deref(), Some("org-a"));
    match &credentials.source {
        SourceSettings::OAuth2 {
            client_secret,
            organization_header,
            extra_params,
            ..
        } => {
            assert_eq!(client_secret.expose(), "s3cret-from-file-91aa");
            assert_eq!(organization_header, "X-Genesys-Organization");
            assert_eq!(
                extra_params,
                &vec![("audience".to_string(), "sip".to_string())]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let debug = format!("{settings:?}");
    assert!(
        !debug.contains("s3cret-from-file"),
        "secret in Debug output"
    );
}

#[test]
fn credential_problems_are_all_reported_with_trunk_and_key() {
    let text = with_credentials(
        "kind = \"oauth2\"\ntoken_url = \"http://user:pw@login.example.com/token\"\n\
         client_secret_file = \"/nonexistent/secret\"\nclient_secret_env = \"X\"\npath = \"/tmp/x\"\nslow_retry = \"soon\"",
    );
    let found = problems(&text);
    let keys = keys(&found);
    for expected in [
        "trunk \"org-a\".credentials.path",
        "trunk \"org-a\".credentials.slow_retry",
        "trunk \"org-a\".credentials.client_secret_file",
        "trunk \"org-a\".credentials.token_url",
        "trunk \"org-a\".credentials.client_id",
    ] {
        assert!(
            keys.contains(&expected),
            "{expected} missing from {found:#?}"
        );
    }
    let url = found.iter().find(|p| p.key.ends_with("token_url")).unwrap();
    assert!(url.message.contains("credentials in the URL"), "{url}");
    assert!(
        !format!("{found:?}").contains("pw@"),
        "the URL's password was echoed"
    );

    let plain_http = with_credentials(
        "kind = \"oauth2\"\ntoken_url = \"http://login.example.com/token\"\nclient_id = \"a\"\nclient_secret_env = \"PATH\"",
    );
    assert_eq!(
        keys_of(&plain_http),
        vec!["trunk \"org-a\".credentials.token_url"]
    );
    let loopback = plain_http.replace("login.example.com", "127.0.0.1:8080");
    assert!(Config::from_toml(&loopback, "t")
        .unwrap()
        .validate()
        .is_ok());

    assert_eq!(
        keys_of(&with_credentials("kind = \"kerberos\"")),
        vec!["trunk \"org-a\".credentials.kind"]
    );
    assert_eq!(
        keys_of(&with_credentials("kind = \"static\"")),
        vec!["trunk \"org-a\".credentials.kind"]
    );
    assert_eq!(
        keys_of(&with_credentials(
            "kind = \"ephemeral\"\nsecret_env = \"PATH\"\nalgorithm = \"md5\""
        )),
        vec![
            "trunk \"org-a\".credentials.user",
            "trunk \"org-a\".credentials.algorithm"
        ]
    );
}

#[test]
fn credential_durations_are_bounded() {
    let text = with_credentials(
        "kind = \"ephemeral\"\nuser = \"u\"\nsecret_env = \"PATH\"\nslow_retry = \"0s\"\nbackoff_max = \"99999h\"\nlifetime = \"1s\"",
    );
    assert_eq!(
        keys_of(&text),
        vec![
            "trunk \"org-a\".credentials.backoff_max",
            "trunk \"org-a\".credentials.slow_retry",
            "trunk \"org-a\".credentials.lifetime"
        ]
    );
}

fn keys_of(text: &str) -> Vec<String> {
    problems(text)
        .into_iter()
        .map(|problem| problem.key)
        .collect()
}

#[test]
fn auth_modes_need_matching_credentials() {
    let base = VALID.replacen(
        "core = \"udp:127.0.0.1:5090\"\n",
        "core = \"udp:127.0.0.1:5090\"\nauth = \"AUTH\"\n",
        1,
    );
    let auth = |mode: &str| base.replace("AUTH", mode);
    assert_eq!(
        keys_of(&auth("bearer")),
        vec!["trunk \"org-a\".auth"],
        "bearer without credentials"
    );
    assert_eq!(
        keys_of(&auth("digest")),
        vec!["trunk \"org-a\".auth"],
        "digest without credentials"
    );
    assert_eq!(keys_of(&auth("magic")), vec!["trunk \"org-a\".auth"]);
    let ephemeral = format!(
        "{}\n[trunk.credentials]\nkind = \"ephemeral\"\nuser = \"u\"\nsecret_env = \"PATH\"\n",
        auth("bearer")
            .split("[[trunk]]\nname = \"org-b\"")
            .next()
            .unwrap()
    );
    let found = problems(&format!("{ephemeral}\n[[trunk]]\nname = \"org-b\"\nedge = \"tcp:127.0.0.3:5080\"\ncore = \"udp:core.example:5090\"\n"));
    assert_eq!(
        keys(&found),
        vec!["trunk \"org-a\".auth"],
        "bearer needs a token: {found:?}"
    );
    let settings = Config::from_toml(&auth("none"), "t")
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(settings.trunks[0].auth, AuthMode::None);
    // The same ephemeral credentials are right for digest: a username and password.
    let digest_ephemeral = ephemeral.replace("auth = \"bearer\"", "auth = \"digest\"");
    let settings = Config::from_toml(
        &format!(
            "{digest_ephemeral}
[[trunk]]
name = \"org-b\"
edge = \"tcp:127.0.0.3:5080\"
core = \"udp:core.example:5090\"
"
        ),
        "t",
    )
    .unwrap()
    .validate()
    .unwrap();
    assert_eq!(settings.trunks[0].auth, AuthMode::Digest);
    let digest_token = format!(
        "{}
[trunk.credentials]
kind = \"static\"
token_env = \"PATH\"
",
        auth("digest")
            .split("[[trunk]]\nname = \"org-b\"")
            .next()
            .unwrap()
    );
    let found = problems(&format!(
        "{digest_token}
[[trunk]]
name = \"org-b\"
edge = \"tcp:127.0.0.3:5080\"
core = \"udp:core.example:5090\"
"
    ));
    assert_eq!(
        keys(&found),
        vec!["trunk \"org-a\".auth"],
        "digest needs a password: {found:?}"
    );
    // digest_realm belongs to digest trunks only, and is never empty.
    let with_realm = |auth_mode: &str, realm: &str| {
        format!(
            "{}\n[[trunk]]\nname = \"org-b\"\nedge = \"tcp:127.0.0.3:5080\"\ncore = \"udp:core.example:5090\"\n",
            digest_ephemeral.replace(
                "auth = \"digest\"",
                &format!("auth = \"{auth_mode}\"\ndigest_realm = \"{realm}\""),
            )
        )
    };
    let settings = Config::from_toml(&with_realm("digest", "core.test"), "t")
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(
        settings.trunks[0].digest_realm.as_deref(),
        Some("core.test")
    );
    assert_eq!(
        keys(&problems(&with_realm("digest", " "))),
        vec!["trunk \"org-a\".digest_realm"]
    );
    assert_eq!(
        keys(&problems(&with_realm("none", "core.test"))),
        vec!["trunk \"org-a\".digest_realm"]
    );
    assert!(
        found[0].message.contains("username and password"),
        "{found:?}"
    );
}

/// org-b (the last trunk) with a `[trunk.registration]` table of `lines`.
fn with_registration(lines: &str) -> String {
    format!("{VALID}\n[trunk.registration]\n{lines}\n")
}

#[test]
fn registration_defaults_and_derived_values() {
    let settings = Config::from_toml(
        &with_registration("aor = \"sip:trunk-b@core.example\""),
        "t",
    )
    .unwrap()
    .validate()
    .unwrap();
    let registration = settings.trunks[1].registration.clone().unwrap();
    assert_eq!(
        registration,
        RegistrationSettings {
            aor: "sip:trunk-b@core.example".into(),
            registrar: "sip:core.example".into(),
            expires: Duration::from_secs(300),
            margin: Duration::from_secs(10),
            reregister_on_refresh: true,
            contact_user: "trunk-b".into(),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    );
    assert!(settings.trunks[0].registration.is_none());
}

#[test]
fn registration_problems_are_all_reported_with_their_keys() {
    let found = problems(&with_registration(
        "aor = \"trunk-b\"\nregistrar = \"http://x\"\nexpires = \"5s\"\nmargin = \"1h\"\n\
         backoff_initial = \"10s\"\nbackoff_max = \"1s\"\ncontact_user = \"a b\"",
    ));
    let prefix = "trunk \"org-b\".registration.";
    let mut found_keys: Vec<String> = keys(&found)
        .iter()
        .map(|key| key.strip_prefix(prefix).unwrap_or(key).to_string())
        .collect();
    found_keys.sort();
    assert_eq!(
        found_keys,
        vec![
            "aor",
            "backoff_max",
            "contact_user",
            "expires",
            "margin",
            "registrar"
        ],
        "{found:?}"
    );
    // An unknown key is a syntax error naming it.
    let error = Config::from_toml(
        &with_registration("aor = \"sip:a@b\"\nexpire = \"60s\""),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("expire"), "{error}");
}

/// VALID with `line` added to its `[sip]` table.
fn with_sip(line: &str) -> String {
    VALID.replacen("t1 = \"100ms\"", &format!("t1 = \"100ms\"\n{line}"), 1)
}

/// The one problem `text` has, which must be on `key`.
fn only_problem(text: &str, key: &str) -> Problem {
    let found = problems(text);
    assert_eq!(keys(&found), vec![key], "{found:?}");
    found[0].clone()
}

const EPHEMERAL: &str = "kind = \"ephemeral\"\nuser = \"u\"\nsecret_env = \"PATH\"";

/// A forced refresh at most once per 0 s is no rate limit: a core refusing every
/// credential would drive token requests back to back. Defect found in issue 12.
#[test]
fn force_refresh_interval_of_zero_is_refused_naming_the_key() {
    let problem = only_problem(
        &with_credentials(&format!("{EPHEMERAL}\nforce_refresh_interval = \"0s\"")),
        "trunk \"org-a\".credentials.force_refresh_interval",
    );
    assert!(problem.message.contains("outside"), "{problem}");
    let one_second = with_credentials(&format!("{EPHEMERAL}\nforce_refresh_interval = \"1s\""));
    assert!(Config::from_toml(&one_second, "t")
        .unwrap()
        .validate()
        .is_ok());
}

/// A refused request waits at most `resend_wait` for the next forced refresh; a wait
/// shorter than the rate limit's interval would let a rotation inside the window fail
/// calls, so the configuration is refused and says so. Defect found in issue 12.
#[test]
fn resend_wait_shorter_than_force_refresh_interval_is_refused_saying_why() {
    let problem = only_problem(
        &with_credentials(&format!(
            "{EPHEMERAL}\nforce_refresh_interval = \"10s\"\nresend_wait = \"6s\""
        )),
        "trunk \"org-a\".credentials.resend_wait",
    );
    assert!(
        problem
            .message
            .contains("shorter than force_refresh_interval"),
        "{problem}"
    );
    assert!(problem.message.contains("would fail calls"), "{problem}");
    let equal = with_credentials(&format!(
        "{EPHEMERAL}\nforce_refresh_interval = \"10s\"\nresend_wait = \"10s\""
    ));
    assert!(Config::from_toml(&equal, "t").unwrap().validate().is_ok());
}

/// A refused BYE must be answered before the Edge gives up on it (Timer F, 32 s), so
/// `resend_wait` is at most 30 s. Defect found in issue 12.
#[test]
fn resend_wait_over_thirty_seconds_is_refused() {
    let problem = only_problem(
        &with_credentials(&format!("{EPHEMERAL}\nresend_wait = \"31s\"")),
        "trunk \"org-a\".credentials.resend_wait",
    );
    assert!(problem.message.contains("outside"), "{problem}");
    let thirty = with_credentials(&format!("{EPHEMERAL}\nresend_wait = \"30s\""));
    assert!(Config::from_toml(&thirty, "t").unwrap().validate().is_ok());
}

/// Without the keys, a refused request waits up to 8 s for a credential forced at most
/// every 5 s: the wait covers the rate limit. Defect found in issue 12.
#[test]
fn credential_defaults_are_a_resend_wait_of_8s_and_a_force_interval_of_5s() {
    let settings = Config::from_toml(&with_credentials(EPHEMERAL), "t")
        .unwrap()
        .validate()
        .unwrap();
    let policy = settings.trunks[0].credentials.as_ref().unwrap().policy;
    assert_eq!(policy.resend_wait, Duration::from_secs(8));
    assert_eq!(policy.force_interval, Duration::from_secs(5));
}

/// An idle timeout of a million hours, or the largest the duration syntax accepts
/// (which saturates), is refused on its key instead of overflowing a deadline; a number
/// beyond u64 is refused as not a duration. Defect found in issue 12.
#[test]
fn huge_tcp_idle_timeout_is_refused_without_a_panic() {
    for huge in [
        "1000000h",
        "18446744073709551615h",
        "18446744073709551615s18446744073709551615h",
        "99999999999999999999h",
    ] {
        let problem = only_problem(
            &with_sip(&format!("tcp_idle_timeout = \"{huge}\"")),
            "sip.tcp_idle_timeout",
        );
        assert!(!problem.message.is_empty(), "{huge}: {problem}");
    }
    let day = Config::from_toml(&with_sip("tcp_idle_timeout = \"24h\""), "t")
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(day.limits.tcp_idle_timeout, Duration::from_secs(24 * 3600));
}

/// A queue capacity of u64::MAX is refused: TOML integers stop at i64::MAX, so the file
/// does not parse (the error shows the line), and i64::MAX itself is refused on its key
/// rather than allocating a queue that size. Defect found in issue 12.
#[test]
fn huge_queue_capacity_is_refused() {
    let error = Config::from_toml(&with_sip("queue_capacity = 18446744073709551615"), "t")
        .unwrap_err()
        .to_string();
    assert!(error.contains("queue_capacity"), "{error}");
    let problem = only_problem(
        &with_sip("queue_capacity = 9223372036854775807"),
        "sip.queue_capacity",
    );
    assert_eq!(
        problem.message,
        "9223372036854775807 is outside 1..=1048576"
    );
    assert_eq!(
        keys(&problems(&with_sip("queue_capacity = 0"))),
        vec!["sip.queue_capacity"]
    );
}

/// A table of zero transactions would answer every request 503. Defect found in issue 12.
#[test]
fn zero_max_transactions_is_refused() {
    let problem = only_problem(&with_sip("max_transactions = 0"), "sip.max_transactions");
    assert_eq!(problem.message, "0 is outside 1..=10000000");
}

/// Every TCP write is bounded: 10 s unless configured, and never 0 s (which would close
/// every connection at its first write). Defect found in issue 12.
#[test]
fn tcp_write_timeout_defaults_to_10s_and_zero_is_refused() {
    let settings = Config::from_toml(VALID, "t").unwrap().validate().unwrap();
    assert_eq!(settings.limits.tcp_write_timeout, Duration::from_secs(10));
    let problem = only_problem(
        &with_sip("tcp_write_timeout = \"0s\""),
        "sip.tcp_write_timeout",
    );
    assert!(problem.message.contains("outside"), "{problem}");
    let configured = Config::from_toml(&with_sip("tcp_write_timeout = \"200ms\""), "t")
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(
        configured.limits.tcp_write_timeout,
        Duration::from_millis(200)
    );
}
