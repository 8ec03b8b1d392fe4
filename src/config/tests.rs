use super::*;
use proptest::prelude::*;

const GOOD: &str = "\
server:
  threads: 2
listen:
  - 127.0.0.1:8080
admin:
  listen: 127.0.0.1:9180
cache:
  chunk_size: 1MiB
  memory:
    capacity: 256MiB
  disk:
    path: /tmp/edgeslice-test
    capacity: 10GiB
upstreams:
  origin:
    servers: [\"10.0.0.1:80\", \"10.0.0.2:80\"]
    connect_timeout: 1s
    read_timeout: 5s
routes:
  - host: \"*.example.com\"
    path_prefix: /
    upstream: origin
    cache: true
";

fn bad(yaml: &str) -> ConfigError {
    match Config::from_yaml(yaml) {
        Ok(_) => panic!("config was accepted:\n{yaml}"),
        Err(e) => e,
    }
}

fn assert_err(yaml: &str, path: &str, line: u64, needle: &str) {
    let e = bad(yaml);
    assert_eq!(e.path, path, "path of {e}");
    assert_eq!(e.line, Some(line), "line of {e}");
    assert!(
        e.message.contains(needle),
        "message of {e} lacks {needle:?}"
    );
    let shown = e.to_string();
    assert!(
        shown.contains(path) && shown.contains(&format!("line {line}")),
        "{shown}"
    );
}

#[test]
fn good_config_parses() {
    let c = Config::from_yaml(GOOD).expect("good config");
    assert_eq!(c.server.threads, 2);
    assert_eq!(c.cache.chunk_size, 1 << 20);
    assert_eq!(c.cache.memory_capacity, 256 << 20);
    assert_eq!(c.cache.disk.as_ref().map(|d| d.capacity), Some(10 << 30));
    assert_eq!(c.upstreams["origin"].servers.len(), 2);
    assert_eq!(c.upstreams["origin"].read_timeout, Duration::from_secs(5));
    assert_eq!(c.admin_listen, Some("127.0.0.1:9180".parse().unwrap()));
    assert_eq!(c.admin_token, None);
    assert!(c.route("a.example.com", "/x").is_some());
    assert!(
        c.route("example.com", "/x").is_none(),
        "wildcard needs a subdomain"
    );
    assert!(
        c.route("A.EXAMPLE.COM", "/x").is_some(),
        "hosts match case-insensitively"
    );
}

#[test]
fn shipped_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/edgeslice.yaml");
    Config::load(&path).expect("conf/edgeslice.yaml must validate");
}

#[test]
fn unknown_key_is_named() {
    let y = GOOD.replace("  chunk_size: 1MiB", "  chunk_sise: 1MiB");
    assert_err(&y, "cache.chunk_sise", 8, "unknown field `chunk_sise`");
}

#[test]
fn wrong_type_is_named() {
    let y = GOOD.replace("  threads: 2", "  threads: [1, 2]");
    let e = bad(&y);
    assert!(e.path.starts_with("server.threads"), "{e}");
    assert_eq!(e.line, Some(2), "{e}");
    let y = GOOD.replace("    cache: true", "    cache: maybe");
    let e = bad(&y);
    assert_eq!(e.path, "routes[0].cache", "{e}");
    assert_eq!(e.line, Some(23), "{e}");
}

#[test]
fn bad_size_is_named() {
    let y = GOOD.replace("capacity: 256MiB", "capacity: 256 parsecs");
    assert_err(&y, "cache.memory.capacity", 10, "invalid size");
}

#[test]
fn bad_duration_is_named() {
    let y = GOOD.replace("read_timeout: 5s", "read_timeout: soon");
    assert_err(&y, "upstreams.origin.read_timeout", 18, "invalid duration");
}

#[test]
fn bad_address_is_named() {
    let y = GOOD.replace("\"10.0.0.2:80\"", "\"10.0.0.2\"");
    assert_err(&y, "upstreams.origin.servers[1]", 16, "invalid address");
    let y = GOOD.replace("  - 127.0.0.1:8080", "  - 127.0.0.1:http");
    assert_err(&y, "listen[0]", 4, "invalid address");
    let y = GOOD.replace("  listen: 127.0.0.1:9180", "  listen: 127.0.0.1:99999");
    assert_err(&y, "admin.listen", 6, "invalid address");
}

#[test]
fn unknown_upstream_is_named() {
    let y = GOOD.replace("upstream: origin", "upstream: orgin");
    assert_err(&y, "routes[0].upstream", 22, "unknown upstream \"orgin\"");
}

#[test]
fn empty_server_list_is_named() {
    let y = GOOD.replace("[\"10.0.0.1:80\", \"10.0.0.2:80\"]", "[]");
    assert_err(&y, "upstreams.origin.servers", 16, "empty");
}

#[test]
fn zero_capacity_and_chunk_size_are_named() {
    let y = GOOD.replace("capacity: 256MiB", "capacity: 0");
    assert_err(&y, "cache.memory.capacity", 10, "greater than zero");
    let y = GOOD.replace("capacity: 10GiB", "capacity: 0GiB");
    assert_err(&y, "cache.disk.capacity", 13, "greater than zero");
    let y = GOOD.replace("chunk_size: 1MiB", "chunk_size: 0");
    assert_err(&y, "cache.chunk_size", 8, "greater than zero");
}

#[test]
fn broken_yaml_is_an_error_with_a_line() {
    let e = bad("server:\n  threads: [2\nlisten: {\n");
    assert!(e.line.is_some(), "{e}");
    let e = bad("");
    assert!(e.message.contains("empty"), "{e}");
    let e = bad("- just\n- a list\n");
    assert!(!e.message.is_empty());
}

#[test]
fn missing_sections_are_errors() {
    let e = bad("listen: [\"127.0.0.1:1\"]\nroutes: []\n");
    assert_eq!(e.path, "upstreams");
    let y = GOOD.split("routes:").next().unwrap().to_string();
    assert_eq!(bad(&y).path, "routes");
}

#[test]
fn query_key_modes() {
    let y = GOOD.replace(
        "    cache: true",
        "    cache: true\n    cache_key:\n      query: [b, a, a]",
    );
    let c = Config::from_yaml(&y).unwrap();
    assert_eq!(
        c.routes[0].query_key,
        QueryKey::Keep(vec!["a".into(), "b".into()])
    );
    let y = GOOD.replace(
        "    cache: true",
        "    cache: true\n    cache_key:\n      query: ignore",
    );
    assert_eq!(
        Config::from_yaml(&y).unwrap().routes[0].query_key,
        QueryKey::Ignore
    );
    let y = GOOD.replace(
        "    cache: true",
        "    cache: true\n    cache_key:\n      query: some",
    );
    assert_err(
        &y,
        "routes[0].cache_key.query",
        25,
        "invalid query key mode",
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    /// Arbitrary text, and the good config with a byte flipped anywhere, never panic.
    #[test]
    fn never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
        let _ = Config::from_yaml(&s);
    }

    #[test]
    fn never_panics_on_mutated_config(pos in 0usize..GOOD.len(), c in proptest::char::any()) {
        let mut y: Vec<char> = GOOD.chars().collect();
        if pos < y.len() { y[pos] = c; }
        let y: String = y.into_iter().collect();
        let _ = Config::from_yaml(&y);
    }
}

#[test]
fn resilience_keys_parse_with_defaults() {
    let c = Config::from_yaml(GOOD).unwrap();
    let u = &c.upstreams["origin"];
    assert_eq!(u.balance, Balance::RoundRobin);
    assert_eq!(u.servers[0].weight, 1);
    assert_eq!(u.retry, DEFAULT_RETRY);
    assert_eq!(
        u.breaker.failure_threshold,
        DEFAULT_BREAKER.failure_threshold
    );
    assert_eq!(u.deadline, DEFAULT_DEADLINE);
    assert!(u.health_check.is_none());
    assert_eq!(c.cache.stale_if_error, DEFAULT_STALE_IF_ERROR);

    let y = GOOD.replace(
        "    read_timeout: 5s\n",
        "    read_timeout: 5s\n    balance: consistent_hash\n    deadline: 20s\n    health_check:\n      path: /health\n      interval: 2s\n    circuit_breaker:\n      failure_threshold: 4\n      open_for: 5s\n      max_open_for: 1m\n      half_open_probes: 2\n    retry:\n      attempts: 4\n      backoff: 100ms\n      max_backoff: 2s\n      budget: 10\n",
    )
    .replace("[\"10.0.0.1:80\", \"10.0.0.2:80\"]", "[\"10.0.0.1:80 weight=3\", {address: \"10.0.0.2:80\", weight: 2}]");
    let c = Config::from_yaml(&y).expect("resilience config");
    let u = &c.upstreams["origin"];
    assert_eq!(u.balance, Balance::ConsistentHash);
    assert_eq!((u.servers[0].weight, u.servers[1].weight), (3, 2));
    assert_eq!(u.deadline, Duration::from_secs(20));
    let hc = u.health_check.as_ref().unwrap();
    assert_eq!(
        (hc.path.as_str(), hc.interval, hc.healthy_after),
        ("/health", Duration::from_secs(2), 2)
    );
    assert_eq!(u.breaker.failure_threshold, 4);
    assert_eq!(u.breaker.max_open_for, Duration::from_secs(60));
    assert_eq!(u.breaker.half_open_probes, 2);
    assert_eq!(
        u.retry,
        RetrySettings {
            attempts: 4,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            budget_percent: 10
        }
    );
}

#[test]
fn bad_resilience_keys_are_named() {
    let with = |extra: &str| {
        GOOD.replace(
            "    read_timeout: 5s\n",
            &format!("    read_timeout: 5s\n{extra}"),
        )
    };
    assert_err(
        &with("    balance: fastest\n"),
        "upstreams.origin.balance",
        19,
        "unknown balance",
    );
    assert_err(
        &with("    retry:\n      budget: 150\n"),
        "upstreams.origin.retry.budget",
        20,
        "percentage",
    );
    assert_err(
        &with("    retry:\n      attempts: 0\n"),
        "upstreams.origin.retry.attempts",
        20,
        "at least 1",
    );
    assert_err(
        &with("    circuit_breaker:\n      open_for: 0s\n"),
        "upstreams.origin.circuit_breaker.open_for",
        20,
        "greater than zero",
    );
    assert_err(
        &with("    circuit_breaker:\n      open_for: 10s\n      max_open_for: 1s\n"),
        "upstreams.origin.circuit_breaker.max_open_for",
        21,
        "shorter",
    );
    assert_err(
        &with("    health_check:\n      path: health\n"),
        "upstreams.origin.health_check.path",
        20,
        "start with",
    );
    assert_err(
        &with("    retry:\n      atempts: 2\n"),
        "upstreams.origin.retry.atempts",
        20,
        "unknown field",
    );
    let y = GOOD.replace("\"10.0.0.2:80\"", "\"10.0.0.2:80 weight=0\"");
    assert_err(
        &y,
        "upstreams.origin.servers[1]",
        16,
        "weight must be at least 1",
    );
    let y = GOOD.replace("\"10.0.0.2:80\"", "\"10.0.0.2:80 heavy\"");
    assert_err(&y, "upstreams.origin.servers[1]", 16, "only `weight=N`");
}

#[test]
fn attribution_keys_parse_with_defaults() {
    let c = Config::from_yaml(GOOD).unwrap();
    let u = &c.upstreams["origin"];
    assert_eq!(u.min_rate, DEFAULT_MIN_RATE);
    assert_eq!(u.min_rate, 16 << 10);
    assert_eq!(u.max_ejected_percent, 50);

    let y = GOOD.replace(
        "    read_timeout: 5s\n",
        "    read_timeout: 5s\n    min_rate: 1MiB/s\n    circuit_breaker:\n      max_ejected_percent: 34\n",
    );
    let c = Config::from_yaml(&y).expect("config");
    let u = &c.upstreams["origin"];
    assert_eq!(u.min_rate, 1 << 20);
    assert_eq!(u.max_ejected_percent, 34);
    // The breaker's own keys keep their defaults when only the cap is set.
    assert_eq!(
        u.breaker.failure_threshold,
        DEFAULT_BREAKER.failure_threshold
    );

    let off = GOOD.replace(
        "    read_timeout: 5s\n",
        "    read_timeout: 5s\n    min_rate: 0\n",
    );
    assert_eq!(
        Config::from_yaml(&off).unwrap().upstreams["origin"].min_rate,
        0
    );
}

#[test]
fn bad_attribution_keys_are_named() {
    let with = |extra: &str| {
        GOOD.replace(
            "    read_timeout: 5s\n",
            &format!("    read_timeout: 5s\n{extra}"),
        )
    };
    assert_err(
        &with("    circuit_breaker:\n      max_ejected_percent: 101\n"),
        "upstreams.origin.circuit_breaker.max_ejected_percent",
        20,
        "percentage",
    );
    assert_err(
        &with("    min_rate: fast\n"),
        "upstreams.origin.min_rate",
        19,
        "invalid rate",
    );
    assert_err(
        &with("    min_rate: 16KiB\n"),
        "upstreams.origin.min_rate",
        19,
        "invalid rate",
    );
}

const SHAPED: &str = "\
shaping:
  client_key: {forwarded_for: {trusted_proxies: [10.0.0.0/8, \"::1\"]}}
  ipv6_prefix: 56
  total_rate: 10GiB/s
  classes:
    standard:
      rate: 1MiB/s
      burst: 256KiB
      rate_after: 0
      weight: 2
      max_downloads: 4
      max_connections: 0
";

#[test]
fn shaping_keys_parse() {
    let y = format!("{GOOD}{SHAPED}").replace(
        "    cache: true\n",
        "    cache: true\n    shaping: standard\n",
    );
    let c = Config::from_yaml(&y).expect("shaping config");
    let s = c.shaping.as_ref().expect("shaping");
    assert_eq!(s.ipv6_prefix, 56);
    assert_eq!(s.total_rate, 10 << 30);
    let std = &s.classes["standard"];
    assert_eq!(
        (std.rate, std.burst, std.weight, std.max_downloads),
        (1 << 20, 256 << 10, 2, 4)
    );
    match &s.client_key {
        crate::shaping::identity::KeySource::ForwardedFor { trusted } => {
            assert_eq!(trusted.len(), 2)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.routes[0].shaping.as_deref(), Some(&**std));
    // Without shaping on the route, nothing is shaped; other key forms parse.
    for key in ["remote_addr", "{header: X-Client-Id}"] {
        let y = format!(
            "{GOOD}{}",
            SHAPED.replace(
                "{forwarded_for: {trusted_proxies: [10.0.0.0/8, \"::1\"]}}",
                key,
            )
        );
        let c = Config::from_yaml(&y).expect(key);
        assert!(c.routes[0].shaping.is_none());
    }
}

#[test]
fn bad_shaping_keys_are_named() {
    let with = |shaping: &str, route: &str| {
        format!("{GOOD}{shaping}")
            .replace("    cache: true\n", &format!("    cache: true\n{route}"))
    };
    assert_err(
        &with(SHAPED, "    shaping: premium\n"),
        "routes[0].shaping",
        24,
        "unknown shaping class \"premium\"",
    );
    assert_err(
        &with("", "    shaping: standard\n"),
        "routes[0].shaping",
        24,
        "unknown shaping class",
    );
    assert_err(
        &with(&SHAPED.replace("rate: 1MiB/s", "rate: fast"), ""),
        "shaping.classes.standard.rate",
        30,
        "invalid rate",
    );
    assert_err(
        &with(&SHAPED.replace("weight: 2", "weight: 0"), ""),
        "shaping.classes.standard.weight",
        33,
        "at least 1",
    );
    assert_err(
        &with(&SHAPED.replace("ipv6_prefix: 56", "ipv6_prefix: 129"), ""),
        "shaping.ipv6_prefix",
        26,
        "0 to 128",
    );
    assert_err(
        &with(&SHAPED.replace("10.0.0.0/8", "10.0.0.0/99"), ""),
        "shaping.client_key.forwarded_for.trusted_proxies[0]",
        25,
        "prefix length",
    );
    assert_err(
        &with(&SHAPED.replace("max_downloads: 4", "max_dowloads: 4"), ""),
        "shaping.classes.standard.max_dowloads",
        34,
        "unknown field",
    );
}

#[test]
fn access_log_keys() {
    let c = Config::from_yaml(GOOD).unwrap();
    assert_eq!(c.server.access_log_format, crate::access_log::Format::Text);
    assert_eq!(c.server.access_log_path, None);
    let y = GOOD.replace(
        "  threads: 2\n",
        "  threads: 2\n  access_log_format: json\n  access_log_path: /var/log/edgeslice/access.log\n",
    );
    let c = Config::from_yaml(&y).unwrap();
    assert_eq!(c.server.access_log_format, crate::access_log::Format::Json);
    assert_eq!(
        c.server.access_log_path.as_deref(),
        Some(std::path::Path::new("/var/log/edgeslice/access.log"))
    );
    let y = GOOD.replace("  threads: 2\n", "  threads: 2\n  access_log_format: xml\n");
    assert_err(&y, "server.access_log_format", 3, "unknown format");
}

#[test]
fn connection_keys_have_defaults_and_are_checked() {
    let c = Config::from_yaml(GOOD).unwrap();
    assert_eq!(c.server.connections, ConnectionSettings::default());
    assert_eq!(
        c.server.connections.keepalive_timeout,
        Duration::from_secs(60)
    );
    assert_eq!(c.server.connections.header_timeout, Duration::from_secs(10));
    assert_eq!(c.server.connections.body_timeout, Duration::from_secs(60));
    assert_eq!(c.server.connections.max_connections, None);
    let y = GOOD.replace(
        "  threads: 2\n",
        "  threads: 2\n  keepalive_timeout: 0s\n  header_timeout: 5s\n  body_timeout: 30s\n  send_timeout: 20s\n  max_connections: 1000\n  max_header_size: 32KiB\n  max_uri_size: 4KiB\n",
    );
    let s = Config::from_yaml(&y).unwrap().server.connections;
    assert_eq!(
        s.keepalive_timeout,
        Duration::ZERO,
        "0 turns keep-alive off"
    );
    assert_eq!(s.header_timeout, Duration::from_secs(5));
    assert_eq!(s.body_timeout, Duration::from_secs(30));
    assert_eq!(s.send_timeout, Duration::from_secs(20));
    assert_eq!(s.max_connections, Some(1000));
    assert_eq!((s.max_header_size, s.max_uri_size), (32 << 10, 4 << 10));
    assert_eq!(
        c.server.connections.body_min_rate, 500,
        "Apache's MinRate by default"
    );

    let with = |line: &str| GOOD.replace("  threads: 2\n", &format!("  threads: 2\n  {line}\n"));
    assert_err(
        &with("header_timeout: 0s"),
        "server.header_timeout",
        3,
        "greater than zero",
    );
    assert_err(
        &with("body_timeout: 0s"),
        "server.body_timeout",
        3,
        "greater than zero",
    );
    assert_err(
        &with("send_timeout: 0s"),
        "server.send_timeout",
        3,
        "greater than zero",
    );
    assert_err(
        &with("max_connections: 0"),
        "server.max_connections",
        3,
        "at least 1",
    );
    assert_err(
        &with("max_header_size: 2MiB"),
        "server.max_header_size",
        3,
        "between",
    );
    for (rate, want) in [("2KiB/s", 2048), ("0", 0), ("100B/s", 100)] {
        let s = Config::from_yaml(&with(&format!("body_min_rate: {rate}")))
            .unwrap()
            .server
            .connections;
        assert_eq!(s.body_min_rate, want, "{rate}");
    }
    assert_err(
        &with("body_min_rate: 2GiB/s"),
        "server.body_min_rate",
        3,
        "at most 1GiB/s",
    );
    assert_err(
        &with("body_min_rate: fast"),
        "server.body_min_rate",
        3,
        "invalid rate",
    );
    assert_err(
        &with("max_uri_size: 10"),
        "server.max_uri_size",
        3,
        "between",
    );
}

#[test]
fn admin_token_is_checked() {
    let with = |token: &str| {
        Config::from_yaml(&format!(
            "listen: [\"127.0.0.1:8080\"]\nadmin:\n  listen: 127.0.0.1:9180\n  token: {token}\nupstreams:\n  o:\n    servers: [\"127.0.0.1:1\"]\nroutes:\n  - upstream: o\n"
        ))
    };
    assert_eq!(
        with("s3cret-token")
            .expect("valid token")
            .admin_token
            .as_deref(),
        Some("s3cret-token")
    );
    let e = with("short").expect_err("too short");
    assert_eq!(e.path, "admin.token");
    assert_eq!(e.line, Some(4));
    assert!(with("\"has space in it\"").is_err());
}

#[test]
fn request_normalisation_keys() {
    let c = Config::from_yaml(GOOD).expect("good config");
    assert!(c.server.merge_slashes);
    assert!(c.server.trusted_proxies.is_empty());
    let yaml = GOOD.replace(
        "  threads: 2\n",
        "  threads: 2\n  merge_slashes: false\n  trusted_proxies: [10.0.0.0/8, \"::1\"]\n",
    );
    let c = Config::from_yaml(&yaml).expect("config");
    assert!(!c.server.merge_slashes);
    assert_eq!(c.server.trusted_proxies.len(), 2);
    assert!(c.server.trusted_proxies[0].contains("10.1.2.3".parse().unwrap()));
    let yaml = GOOD.replace(
        "  threads: 2\n",
        "  threads: 2\n  trusted_proxies: [10.0.0.0/8, nonsense]\n",
    );
    assert_err(
        &yaml,
        "server.trusted_proxies[1]",
        3,
        "invalid address block",
    );
}

#[test]
fn route_hosts_and_prefixes_are_written_canonical() {
    // A trailing dot and case are normalised, as requests' hosts are.
    let yaml = GOOD.replace("\"*.example.com\"", "Media.Example.com.");
    let c = Config::from_yaml(&yaml).expect("config");
    assert_eq!(
        c.routes[0].host,
        HostMatch::Exact("media.example.com".into())
    );
    let yaml = GOOD.replace("\"*.example.com\"", "media.example.com:8080");
    assert_err(&yaml, "routes[0].host", 20, "without a port");
    let yaml = GOOD.replace("    path_prefix: /\n", "    path_prefix: /a/../b/\n");
    assert_err(&yaml, "routes[0].path_prefix", 21, "write \"/b/\"");
    let yaml = GOOD.replace("    path_prefix: /\n", "    path_prefix: /%76ideo/\n");
    assert_err(&yaml, "routes[0].path_prefix", 21, "write \"/video/\"");
    let yaml = GOOD.replace("    path_prefix: /\n", "    path_prefix: //video/\n");
    assert_err(&yaml, "routes[0].path_prefix", 21, "write \"/video/\"");
}

#[test]
fn table_capacities_default_from_the_tiers_and_are_checked() {
    let c = Config::from_yaml(GOOD).expect("good config");
    // A quarter of the 256 MiB memory tier; 0.1 % of the 10 GiB disk, at least 16 MiB.
    assert_eq!(c.cache.metadata_capacity, 64 << 20);
    assert_eq!(
        c.cache.disk.as_ref().map(|d| d.index_capacity),
        Some(16 << 20)
    );
    assert_eq!(
        default_metadata_capacity(1 << 20),
        1 << 20,
        "at least 1 MiB"
    );
    assert_eq!(default_index_capacity(1 << 40), 1 << 30);

    let set = GOOD
        .replace("  memory:\n", "  metadata_capacity: 8MiB\n  memory:\n")
        .replace(
            "    capacity: 10GiB\n",
            "    capacity: 10GiB\n    index_capacity: 2MiB\n",
        );
    let c = Config::from_yaml(&set).expect("capacities set");
    assert_eq!(c.cache.metadata_capacity, 8 << 20);
    assert_eq!(
        c.cache.disk.as_ref().map(|d| d.index_capacity),
        Some(2 << 20)
    );

    let small_meta = GOOD.replace("  memory:\n", "  metadata_capacity: 1KiB\n  memory:\n");
    assert_err(&small_meta, "cache.metadata_capacity", 9, "at least 64KiB");
    let zero_index = GOOD.replace(
        "    capacity: 10GiB\n",
        "    capacity: 10GiB\n    index_capacity: 0\n",
    );
    assert_err(
        &zero_index,
        "cache.disk.index_capacity",
        14,
        "at least 64KiB",
    );
}

#[test]
fn the_response_budget_defaults_to_64_mib_or_8_chunks_and_holds_a_chunk_at_least() {
    let c = Config::from_yaml(GOOD).expect("good config");
    assert_eq!(c.cache.response_budget, 64 << 20);
    assert_eq!(
        default_response_budget(16 << 20),
        128 << 20,
        "8 chunks of 16 MiB"
    );
    let set = GOOD.replace("  memory:\n", "  response_budget: 8MiB\n  memory:\n");
    let c = Config::from_yaml(&set).expect("budget set");
    assert_eq!(c.cache.response_budget, 8 << 20);
    let small = GOOD.replace("  memory:\n", "  response_budget: 512KiB\n  memory:\n");
    assert_err(
        &small,
        "cache.response_budget",
        9,
        "must be at least cache.chunk_size",
    );
}

/// An upstream group `store` with `extra` (indented four spaces) and one route to it.
/// The server the first entry of `u` makes at some address (its name, for TLS).
fn first(u: &UpstreamSettings) -> ServerSpec {
    u.servers[0].at(SocketAddr::from(([127, 0, 0, 1], 443)))
}

#[test]
fn server_names_are_kept_for_run_time_not_resolved_here() {
    let c = Config::from_yaml(&with_store(
        r#"origin.invalid:80", "Origin.Example.:8080 weight=2", "10.0.0.1:80", "[::1]:81", "::1:82"#,
        "",
    ))
    .expect("a name that does not resolve is no config error");
    let u = &c.upstreams["store"];
    let targets: Vec<&ServerTarget> = u.servers.iter().map(|s| &s.target).collect();
    assert_eq!(
        targets,
        [
            &ServerTarget::Name {
                host: "origin.invalid".into(),
                port: 80
            },
            &ServerTarget::Name {
                host: "origin.example.".into(),
                port: 8080
            },
            &ServerTarget::Addr("10.0.0.1:80".parse().unwrap()),
            &ServerTarget::Addr("[::1]:81".parse().unwrap()),
            &ServerTarget::Addr("[::1]:82".parse().unwrap()),
        ]
    );
    assert_eq!(u.servers[1].weight, 2);
    // The name for TLS drops the trailing dot; an address has none.
    assert_eq!(u.servers[1].name(), Some("origin.example"));
    assert_eq!(u.servers[2].name(), None);
    assert_eq!(
        u.names(),
        [("origin.invalid", 80), ("origin.example.", 8080)]
    );
    assert_eq!(u.resolve_interval, DEFAULT_RESOLVE_INTERVAL);
    for bad in ["bad/name:80", "a..b:80", "-:x", ":80", "host:"] {
        let e = Config::from_yaml(&with_store(bad, "")).expect_err(bad);
        assert_eq!(e.path, "upstreams.store.servers[0]", "{bad}: {e}");
        assert!(e.message.contains("invalid address"), "{bad}: {e}");
    }
}

#[test]
fn resolve_interval_is_a_positive_duration() {
    let c = Config::from_yaml(&with_store(
        "origin:80",
        "    resolve_interval: 1500ms
",
    ))
    .expect("config");
    assert_eq!(
        c.upstreams["store"].resolve_interval,
        Duration::from_millis(1500)
    );
    assert_err(
        &with_store(
            "origin:80",
            "    resolve_interval: 0s
",
        ),
        "upstreams.store.resolve_interval",
        6,
        "greater than zero",
    );
    assert_err(
        &with_store(
            "origin:80",
            "    resolve_interval: often
",
        ),
        "upstreams.store.resolve_interval",
        6,
        "invalid duration",
    );
}

fn with_store(server: &str, extra: &str) -> String {
    format!(
        "listen:\n  - 127.0.0.1:8080\nupstreams:\n  store:\n    servers: [\"{server}\"]\n{extra}routes:\n  - upstream: store\n"
    )
}

/// A PEM file holding one self-signed certificate.
fn ca_file(dir: &std::path::Path) -> PathBuf {
    use openssl::{
        asn1::Asn1Time, hash::MessageDigest, pkey::PKey, rsa::Rsa, x509::X509NameBuilder,
    };
    let key = PKey::from_rsa(Rsa::generate(2048).expect("rsa")).expect("pkey");
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", "test ca").expect("cn");
    let name = name.build();
    let mut b = X509::builder().expect("builder");
    b.set_version(2).expect("version");
    b.set_subject_name(&name).expect("subject");
    b.set_issuer_name(&name).expect("issuer");
    b.set_pubkey(&key).expect("pubkey");
    b.set_not_before(&Asn1Time::days_from_now(0).expect("t"))
        .expect("nb");
    b.set_not_after(&Asn1Time::days_from_now(30).expect("t"))
        .expect("na");
    b.sign(&key, MessageDigest::sha256()).expect("sign");
    let path = dir.join("ca.pem");
    std::fs::write(&path, b.build().to_pem().expect("pem")).expect("write ca");
    path
}

use pingora_core::tls::x509::X509;

#[test]
fn upstream_tls_defaults_and_sni_per_server() {
    let c = Config::from_yaml(&with_store("127.0.0.1:443", "    tls: {}\n")).expect("config");
    let u = &c.upstreams["store"];
    let tls = u.tls.as_ref().expect("tls");
    assert!(tls.verify && tls.ca.is_none() && tls.sni.is_none());
    assert!(!u.http2 && u.host.is_none());
    assert!(c.warnings.is_empty());
    // An IP server with no name: no SNI (verified against its address).
    assert_eq!(u.sni_for(&first(u)), None);
    // A server written by name: that name.
    let c = Config::from_yaml(&with_store("LocalHost:443", "    tls: {}\n")).expect("config");
    let u = &c.upstreams["store"];
    assert_eq!(u.sni_for(&first(u)), Some("localhost"));
    // `host` comes before the server's name, `tls.sni` before both.
    let c = Config::from_yaml(&with_store(
        "localhost:443",
        "    host: bucket.example:8443\n    tls: {}\n    http2: true\n",
    ))
    .expect("config");
    let u = &c.upstreams["store"];
    assert_eq!(u.host.as_deref(), Some("bucket.example:8443"));
    assert_eq!(u.sni_for(&first(u)), Some("bucket.example"));
    assert!(u.http2);
    let c = Config::from_yaml(&with_store(
        "localhost:443",
        "    host: bucket.example\n    tls:\n      sni: Other.Example\n",
    ))
    .expect("config");
    let u = &c.upstreams["store"];
    assert_eq!(u.sni_for(&first(u)), Some("other.example"));
    // No `tls`: plain, whatever `host` says.
    let c = Config::from_yaml(&with_store("localhost:80", "    host: a.example\n")).expect("c");
    let u = &c.upstreams["store"];
    assert!(u.tls.is_none());
    assert_eq!(u.sni_for(&first(u)), None);
}

#[test]
fn verify_false_is_allowed_with_a_warning_naming_key_and_line() {
    let c = Config::from_yaml(&with_store(
        "127.0.0.1:443",
        "    tls:\n      verify: false\n",
    ))
    .expect("config");
    assert!(!c.upstreams["store"].tls.as_ref().expect("tls").verify);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("upstreams.store.tls.verify (line 7)"),
        "{:?}",
        c.warnings
    );
}

#[test]
fn upstream_tls_errors_name_key_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.pem");
    let yaml = with_store(
        "127.0.0.1:443",
        &format!("    tls:\n      ca: {}\n", missing.display()),
    );
    assert_err(&yaml, "upstreams.store.tls.ca", 7, "cannot read");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let yaml = with_store(
        "127.0.0.1:443",
        &format!("    tls:\n      ca: {}\n", empty.display()),
    );
    assert_err(&yaml, "upstreams.store.tls.ca", 7, "no PEM certificate");
    let unreadable = dir.path().join("a-directory.pem");
    std::fs::create_dir(&unreadable).expect("mkdir");
    let yaml = with_store(
        "127.0.0.1:443",
        &format!("    tls:\n      ca: {}\n", unreadable.display()),
    );
    assert_err(&yaml, "upstreams.store.tls.ca", 7, "cannot read");
    let good = ca_file(dir.path());
    let c = Config::from_yaml(&with_store(
        "127.0.0.1:443",
        &format!("    tls:\n      ca: {}\n", good.display()),
    ))
    .expect("config");
    let ca = c.upstreams["store"]
        .tls
        .as_ref()
        .and_then(|t| t.ca.as_ref());
    assert_eq!(ca.map(|c| c.certs.len()), Some(1));
    assert_err(
        &with_store("127.0.0.1:443", "    tls:\n      sni: a.example:443\n"),
        "upstreams.store.tls.sni",
        7,
        "invalid sni",
    );
    assert_err(
        &with_store("127.0.0.1:443", "    host: \"a b\"\n"),
        "upstreams.store.host",
        6,
        "invalid host",
    );
    assert_err(
        &with_store("127.0.0.1:80", "    http2: true\n"),
        "upstreams.store.http2",
        6,
        "needs `tls`",
    );
    let e = bad(&with_store(
        "127.0.0.1:443",
        "    tls:\n      verify: maybe\n",
    ));
    assert!(e.path.starts_with("upstreams.store.tls.verify"), "{e}");
    let e = bad(&with_store("127.0.0.1:443", "    tls:\n      cert: x\n"));
    assert!(e.to_string().contains("cert"), "{e}");
}

const TLS_LISTEN: &str = "\
listen:
  - 127.0.0.1:8080
  - address: 0.0.0.0:8443
    tls:
      certificates:
        - {cert: /etc/edgeslice/site.pem, key: /etc/edgeslice/site.key}
        - cert: /etc/edgeslice/other.pem
          key: /etc/edgeslice/other.key
      min_version: \"1.2\"
    http2: true
  - address: 127.0.0.1:8081
    h2c: true
upstreams:
  origin:
    servers: [\"10.0.0.1:80\"]
routes:
  - upstream: origin
";

#[test]
fn listen_entries_plain_tls_and_h2c() {
    let c = Config::from_yaml(TLS_LISTEN).unwrap();
    assert_eq!(c.listen.len(), 3);
    let plain = &c.listen[0];
    assert_eq!(plain.address, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(plain.name, "127.0.0.1:8080");
    assert!(plain.tls.is_none() && !plain.http2 && !plain.h2c);
    let tls = &c.listen[1];
    assert_eq!(tls.name, "0.0.0.0:8443");
    assert!(tls.http2 && !tls.h2c);
    let t = tls.tls.as_ref().unwrap();
    assert_eq!(t.min_version, TlsVersion::Tls12);
    assert_eq!(t.certificates.len(), 2);
    assert_eq!(
        t.certificates[1].cert,
        PathBuf::from("/etc/edgeslice/other.pem")
    );
    assert_eq!(
        t.certificates[1].key_at.path,
        "listen[1].tls.certificates[1].key"
    );
    assert_eq!(t.certificates[1].key_at.line, 8);
    assert_eq!(t.certificates[0].cert_at.line, 6);
    let h2c = &c.listen[2];
    assert!(h2c.tls.is_none() && h2c.h2c && !h2c.http2);
    assert_eq!(c.server.connections.http2_max_streams, 128);
}

#[test]
fn http2_defaults_to_true_on_tls_listeners_only_and_can_be_off() {
    let y = TLS_LISTEN.replace("    http2: true\n", "");
    assert!(Config::from_yaml(&y).unwrap().listen[1].http2);
    let y = TLS_LISTEN.replace("    http2: true\n", "    http2: false\n");
    assert!(!Config::from_yaml(&y).unwrap().listen[1].http2);
}

#[test]
fn min_version_as_string_or_bare_number() {
    for (written, want) in [
        ("\"1.2\"", TlsVersion::Tls12),
        ("1.2", TlsVersion::Tls12),
        ("\"1.3\"", TlsVersion::Tls13),
        ("1.3", TlsVersion::Tls13),
        ("'1.3'", TlsVersion::Tls13),
    ] {
        let y = TLS_LISTEN.replace("min_version: \"1.2\"", &format!("min_version: {written}"));
        let c = Config::from_yaml(&y).unwrap();
        assert_eq!(
            c.listen[1].tls.as_ref().unwrap().min_version,
            want,
            "{written}"
        );
    }
    let y = TLS_LISTEN.replace("      min_version: \"1.2\"\n", "");
    let c = Config::from_yaml(&y).unwrap();
    assert_eq!(
        c.listen[1].tls.as_ref().unwrap().min_version,
        TlsVersion::Tls12
    );
}

#[test]
fn unknown_min_version_is_named() {
    for bad_version in ["\"1.1\"", "1.0", "\"TLSv1.3\"", "2", "\"\""] {
        let y = TLS_LISTEN.replace(
            "min_version: \"1.2\"",
            &format!("min_version: {bad_version}"),
        );
        assert_err(&y, "listen[1].tls.min_version", 9, "unknown TLS version");
    }
}

#[test]
fn listen_entry_errors_are_named() {
    let y = TLS_LISTEN.replace("address: 0.0.0.0:8443", "address: 0.0.0.0:99999");
    assert_err(&y, "listen[1].address", 3, "invalid address");
    let y = TLS_LISTEN.replace(
        "        - {cert: /etc/edgeslice/site.pem, key: /etc/edgeslice/site.key}\n        - cert: /etc/edgeslice/other.pem\n          key: /etc/edgeslice/other.key\n",
        "        []\n",
    ).replace("      certificates:\n        []", "      certificates: []");
    assert_err(
        &y,
        "listen[1].tls.certificates",
        5,
        "at least one certificate",
    );
    let y = TLS_LISTEN.replace("key: /etc/edgeslice/site.key", "key: \"\"");
    assert_err(
        &y,
        "listen[1].tls.certificates[0].key",
        6,
        "must not be empty",
    );
    // A misspelt key in an entry is an error, not a silent default.
    let e = bad(&TLS_LISTEN.replace("    h2c: true", "    h2C: true"));
    assert!(e.to_string().contains("h2C"), "{e}");
    let e = bad(&TLS_LISTEN.replace("      min_version", "      minversion"));
    assert!(e.to_string().contains("minversion"), "{e}");
}

#[test]
fn http2_max_streams_is_checked() {
    for v in ["0", "1025"] {
        let y = format!("server:\n  http2_max_streams: {v}\n{TLS_LISTEN}");
        assert_err(&y, "server.http2_max_streams", 2, "between 1 and 1024");
    }
    let y = format!("server:\n  http2_max_streams: 7\n{TLS_LISTEN}");
    assert_eq!(
        Config::from_yaml(&y)
            .unwrap()
            .server
            .connections
            .http2_max_streams,
        7
    );
}

#[test]
fn a_tls_key_with_nothing_under_it_is_still_tls() {
    // An upstream: HTTPS with every default (here every key under it commented out).
    for tls in [
        "    tls:
",
        "    tls:
      # verify: false
",
        "    tls: ~
",
    ] {
        let c = Config::from_yaml(&with_store("localhost:443", tls)).expect("config");
        let t = c.upstreams["store"].tls.as_ref().expect("HTTPS, not plain");
        assert!(t.verify && t.ca.is_none() && t.sni.is_none(), "{tls:?}");
    }
    // A listener: an error (no certificate), never a plain listener on a port meant for TLS.
    let y = TLS_LISTEN.replace(
        "    tls:\n      certificates:\n        - {cert: /etc/edgeslice/site.pem, key: /etc/edgeslice/site.key}\n        - cert: /etc/edgeslice/other.pem\n          key: /etc/edgeslice/other.key\n      min_version: \"1.2\"\n",
        "    tls:\n",
    );
    assert_ne!(y, TLS_LISTEN);
    assert_err(
        &y,
        "listen[1].tls.certificates",
        4,
        "at least one certificate",
    );
}

/// `GOOD` with `extra` appended: its first line is line 24.
fn with(extra: &str) -> String {
    assert_eq!(GOOD.lines().count(), 23);
    format!("{GOOD}{extra}")
}

#[test]
fn cluster_absent_is_a_single_node_with_the_default_id() {
    let c = Config::from_yaml(GOOD).unwrap();
    assert_eq!(c.cluster, ClusterSettings::default());
    assert_eq!(c.cluster.cdn_id, "edgeslice");
    assert!(c.cluster.peers.is_none());
    assert!(c.routes.iter().all(|r| r.parent.is_none()));
}

#[test]
fn cluster_keys_parse_with_their_defaults() {
    let c = Config::from_yaml(&with(
        "cluster:\n  self: Edge-1.edges.svc.:8080\n  peers:\n    - edge-0.edges.svc:8080\n    - edge-1.edges.svc:8080\n    - 10.0.0.9:8080\n",
    ))
    .unwrap();
    let p = c.cluster.peers.as_ref().unwrap();
    // Canonical, never resolved (these names do not exist).
    assert_eq!(p.self_name, "edge-1.edges.svc:8080");
    assert_eq!(
        p.peers,
        [
            "edge-0.edges.svc:8080",
            "edge-1.edges.svc:8080",
            "10.0.0.9:8080"
        ]
    );
    assert_eq!(p.resolve_interval, Duration::from_secs(10));
    assert_eq!(p.shard_size, 16 << 20);
    assert_eq!(p.keep_copies, KeepCopies::Memory);
    assert_eq!(p.peer_timeout, Duration::from_secs(2));
    assert_eq!(c.cluster.cdn_id, "edgeslice");
    // Acted on: no warning. The other peers are the peer group, by name or address.
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(p.group.name, "cluster.peers");
    assert_eq!(
        p.group
            .servers
            .iter()
            .map(|s| s.target.clone())
            .collect::<Vec<_>>(),
        [
            ServerTarget::Name {
                host: "edge-0.edges.svc".into(),
                port: 8080
            },
            ServerTarget::Addr("10.0.0.9:8080".parse().unwrap()),
        ]
    );
    assert_eq!(p.group.connect_timeout, Duration::from_secs(2));
    assert_eq!(p.group.read_timeout, Duration::from_secs(2));
    assert_eq!(p.group.resolve_interval, Duration::from_secs(10));
    assert_eq!(p.group.retry.attempts, 1);
    assert_eq!(p.group.breaker.failure_threshold, 2);
    assert_eq!(c.upstream_groups().count(), c.upstreams.len() + 1);
    // No upstream may take the peer group's name.
    let e = bad(&GOOD
        .replace("  origin:\n", "  cluster.peers:\n")
        .replace("upstream: origin", "upstream: cluster.peers"));
    assert!(e.to_string().contains("peer group"), "{e}");

    let c = Config::from_yaml(&with(
        "cluster:\n  self: a:1\n  peers: [a:1, b:1]\n  resolve_interval: 30s\n  shard_size: 4MiB\n  keep_copies: none\n  peer_timeout: 500ms\n  cdn_id: edge\n",
    ))
    .unwrap();
    let p = c.cluster.peers.as_ref().unwrap();
    assert_eq!(p.resolve_interval, Duration::from_secs(30));
    assert_eq!(p.shard_size, 4 << 20);
    assert_eq!(p.keep_copies, KeepCopies::None);
    assert_eq!(p.peer_timeout, Duration::from_millis(500));
    assert_eq!(c.cluster.cdn_id, "edge");
}

#[test]
fn cdn_id_may_be_given_alone() {
    let c = Config::from_yaml(&with("cluster:\n  cdn_id: shield-eu\n")).unwrap();
    assert_eq!(c.cluster.cdn_id, "shield-eu");
    assert!(c.cluster.peers.is_none());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn cluster_errors_are_named() {
    assert_err(
        &with("cluster:\n  cdn_id: \"edge one\"\n"),
        "cluster.cdn_id",
        25,
        "token",
    );
    assert_err(
        &with("cluster:\n  cdn_id: \"\"\n"),
        "cluster.cdn_id",
        25,
        "token",
    );
    assert_err(
        &with(&format!("cluster:\n  cdn_id: {}\n", "e".repeat(65))),
        "cluster.cdn_id",
        25,
        "1 to 64",
    );
    assert_err(
        &with("cluster:\n  cdn_id: \"edge,x\"\n"),
        "cluster.cdn_id",
        25,
        "token",
    );
    assert_err(
        &with("cluster:\n  self: c:1\n  peers: [a:1, b:1]\n"),
        "cluster.self",
        25,
        "not one of cluster.peers",
    );
    assert_err(
        &with("cluster:\n  self: a:1\n  peers: [a:1, B:1, b.:1]\n"),
        "cluster.peers[2]",
        26,
        "already cluster.peers[1]",
    );
    assert_err(
        &with("cluster:\n  self: a:1\n  peers: [a:1, b]\n"),
        "cluster.peers[1]",
        26,
        "port is required",
    );
    assert_err(
        &with("cluster:\n  self: a:1\n  peers: [a:1, \"b c:1\"]\n"),
        "cluster.peers[1]",
        26,
        "host:port",
    );
    assert_err(
        &with("cluster:\n  self: a:1\n  peers: [a:1, b:0]\n"),
        "cluster.peers[1]",
        26,
        "host:port",
    );
    assert_err(
        &with("cluster:\n  self: a:1\n  peers: []\n"),
        "cluster.peers",
        26,
        "empty",
    );
    assert_err(
        &with("cluster:\n  self: a:1\n"),
        "cluster.self",
        25,
        "needs cluster.peers",
    );
    assert_err(
        &with("cluster:\n  peers: [a:1]\n"),
        "cluster.peers",
        25,
        "needs cluster.self",
    );
    assert_err(
        &with("cluster:\n  cdn_id: edge\n  shard_size: 4MiB\n"),
        "cluster.shard_size",
        26,
        "only cdn_id may be given alone",
    );
    assert_err(
        &with("cluster:\n  self: a:1\n  peers: [a:1]\n  shard_size: 1536KiB\n"),
        "cluster.shard_size",
        27,
        "multiple of cache.chunk_size",
    );
    assert_err(
        &with("cluster:\n  self: a:1\n  peers: [a:1]\n  shard_size: 0\n"),
        "cluster.shard_size",
        27,
        "multiple of cache.chunk_size",
    );
    assert_err(
        &with("cluster:\n  self: a:1\n  peers: [a:1]\n  peer_timeout: 0s\n"),
        "cluster.peer_timeout",
        27,
        "greater than zero",
    );
    let e = bad(&with(
        "cluster:\n  self: a:1\n  peers: [a:1]\n  keep_copies: disk\n",
    ));
    assert_eq!(e.path, "cluster.keep_copies", "{e}");
    assert_eq!(e.line, Some(27), "{e}");
    let e = bad(&with("cluster:\n  cdn_id: x\n  ring: 3\n"));
    assert!(e.to_string().contains("ring"), "{e}");
}

#[test]
fn route_parent_names_another_group() {
    let two_groups = GOOD.replace(
        "routes:\n",
        "  shield:\n    servers: [\"10.0.0.3:8080\"]\n    balance: consistent_hash\nroutes:\n",
    );
    let c = Config::from_yaml(&two_groups.replace(
        "    upstream: origin\n",
        "    upstream: origin\n    parent: shield\n",
    ))
    .unwrap();
    assert_eq!(c.routes[0].parent.as_ref().unwrap().name, "shield");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_err(
        &two_groups.replace(
            "    upstream: origin\n",
            "    upstream: origin\n    parent: shields\n",
        ),
        "routes[0].parent",
        26,
        "unknown upstream \"shields\"",
    );
    assert_err(
        &two_groups.replace(
            "    upstream: origin\n",
            "    upstream: origin\n    parent: origin\n",
        ),
        "routes[0].parent",
        26,
        "the route's own upstream",
    );
}

#[test]
fn cluster_self_may_come_from_the_environment() {
    let c = Config::from_yaml(&with(
        "cluster:\n  self: edge-0.edges:8080\n  peers: [edge-0.edges:8080, edge-1.edges:8080, edge-2.edges:8080]\n",
    ))
    .unwrap();
    // EDGESLICE_CLUSTER_SELF names another peer: that one is left out of the peer group.
    let moved = c.cluster.with_self("Edge-2.edges.:8080").unwrap();
    let p = moved.peers.as_ref().unwrap();
    assert_eq!(p.self_name, "edge-2.edges:8080");
    let names: Vec<_> = p.group.servers.iter().map(|s| s.target.clone()).collect();
    assert_eq!(
        names,
        [
            ServerTarget::Name {
                host: "edge-0.edges".into(),
                port: 8080
            },
            ServerTarget::Name {
                host: "edge-1.edges".into(),
                port: 8080
            },
        ]
    );
    let e = c.cluster.with_self("edge-9.edges:8080").unwrap_err();
    assert!(
        e.contains("EDGESLICE_CLUSTER_SELF") && e.contains("not one of"),
        "{e}"
    );
    assert!(c
        .cluster
        .with_self("edge-0.edges")
        .unwrap_err()
        .contains("port"));
    let single = Config::from_yaml(&with("cluster:\n  cdn_id: x\n")).unwrap();
    assert!(single
        .cluster
        .with_self("a:1")
        .unwrap_err()
        .contains("no cluster.peers"));
}
