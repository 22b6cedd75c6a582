//! Every service built from our Dockerfile runs one of our binaries, with subcommands and flags
//! that binary has and only environment variables it reads (from its `--help`, i.e. clap's
//! `env = …`); healthchecks that run our binaries too; the Dockerfile installs every binary
//! compose runs; and the check itself refuses what it should.

use super::*;

fn bin_dir() -> PathBuf {
    // target/<profile>/deps/compose-<hash> → target/<profile>/
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("test executable outside target/<profile>/deps").to_owned()
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: this test runs the service binaries' --help; build them first with \
         `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// One command level's `--help`, parsed.
#[derive(Debug)]
struct Help {
    /// `binary sub sub` as typed, for messages.
    invocation: String,
    /// Subcommand names (`help` left out).
    commands: BTreeSet<String>,
    /// Option spellings (`--addr`, `-h`) → whether the option takes a value.
    options: BTreeMap<String, bool>,
    /// Names in `[env: NAME=…]`.
    env: BTreeSet<String>,
    /// Whether the level takes positional arguments (an `Arguments:` section).
    positionals: bool,
    /// Whether this level's options may be given together with a subcommand (one usage line
    /// shows both); false with `args_conflicts_with_subcommands`, where they configure the
    /// default command only.
    options_with_subcommand: bool,
}

fn help(bin: &str, path: &[String]) -> Result<Help, String> {
    let invocation =
        std::iter::once(bin.to_owned()).chain(path.iter().cloned()).collect::<Vec<_>>().join(" ");
    let output = Command::new(binary(bin))
        .args(path)
        .arg("--help")
        // The inherited environment would only show up as values in `[env: NAME=value]`.
        .env_clear()
        .output()
        .map_err(|e| format!("`{invocation} --help`: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{invocation} --help` exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(parse_help(invocation, &String::from_utf8_lossy(&output.stdout)))
}

fn parse_help(invocation: String, text: &str) -> Help {
    let mut help = Help {
        invocation,
        commands: BTreeSet::new(),
        options: BTreeMap::new(),
        env: BTreeSet::new(),
        positionals: false,
        options_with_subcommand: false,
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(usage) = line.strip_prefix("Usage:") {
            section = "Usage";
            help.options_with_subcommand |= usage_with_both(usage);
            continue;
        }
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':');
            continue;
        }
        if line.trim().is_empty() {
            section = "";
            continue;
        }
        match section {
            "Usage" => help.options_with_subcommand |= usage_with_both(line),
            "Commands" if line.starts_with("  ") && !line.starts_with("   ") => {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name != "help" {
                    help.commands.insert(name.to_owned());
                }
            }
            "Arguments" => help.positionals = true,
            "Options" if line.trim_start().starts_with('-') => {
                let tokens: Vec<&str> = line.split_whitespace().collect();
                let names: Vec<&str> = tokens
                    .iter()
                    .map(|t| t.trim_end_matches(','))
                    .take_while(|t| t.starts_with('-'))
                    .collect();
                let takes_value = tokens.get(names.len()).is_some_and(|t| t.starts_with(['<', '[']));
                for name in names {
                    help.options.insert(name.to_owned(), takes_value);
                }
            }
            _ => {}
        }
    }
    let mut rest = text;
    while let Some(at) = rest.find("[env: ") {
        rest = &rest[at + "[env: ".len()..];
        let end = rest.find(['=', ']']).unwrap_or(rest.len());
        help.env.insert(rest[..end].to_owned());
    }
    help
}

fn usage_with_both(line: &str) -> bool {
    line.contains("[OPTIONS]") && (line.contains("<COMMAND>") || line.contains("[COMMAND]"))
}

/// What an argv resolves to: the help of every level on the way (binary, subcommand, …).
#[derive(Debug)]
struct Resolved {
    levels: Vec<Help>,
}

impl Resolved {
    /// Environment variables the invocation reads: the last level's (clap repeats `global`
    /// options there), and those of each parent whose options combine with a subcommand.
    fn env(&self) -> BTreeSet<String> {
        let (last, parents) = self.levels.split_last().expect("at least the binary");
        let mut env = last.env.clone();
        for parent in parents.iter().filter(|p| p.options_with_subcommand) {
            env.extend(parent.env.iter().cloned());
        }
        env
    }

    fn invocation(&self) -> &str {
        &self.levels.last().expect("at least the binary").invocation
    }
}

/// Walks `argv` (binary first) through the binary's subcommands, checking every option against
/// the level it is given at and every bare word against that level's subcommands and arguments.
fn resolve(argv: &[String]) -> Result<Resolved, String> {
    let (bin, args) = argv.split_first().ok_or("empty command")?;
    let bin = bin.rsplit('/').next().unwrap_or(bin);
    if !OURS.contains(&bin) {
        return Err(format!("`{bin}` is not one of the image's binaries ({})", OURS.join(", ")));
    }
    let mut path = Vec::new();
    let mut levels = vec![help(bin, &path)?];
    let mut only_positionals = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let level = levels.last().expect("at least the binary");
        if arg == "--" {
            only_positionals = true;
        } else if !only_positionals && arg.starts_with('-') && arg.len() > 1 {
            let (name, inline_value) = match arg.split_once('=') {
                Some((name, _)) => (name, true),
                None => (arg.as_str(), false),
            };
            let takes_value = *level
                .options
                .get(name)
                .ok_or_else(|| format!("`{}` has no option `{name}`", level.invocation))?;
            if takes_value && !inline_value {
                args.next().ok_or_else(|| format!("`{}`: `{name}` needs a value", level.invocation))?;
            }
        } else if !only_positionals && level.commands.contains(arg) {
            path.push(arg.clone());
            levels.push(help(bin, &path)?);
        } else if level.positionals {
            only_positionals = true;
        } else {
            return Err(format!(
                "`{}` takes no argument `{arg}` (subcommands: {})",
                level.invocation,
                if level.commands.is_empty() {
                    "none".to_owned()
                } else {
                    level.commands.iter().cloned().collect::<Vec<_>>().join(", ")
                }
            ));
        }
    }
    Ok(Resolved { levels })
}

/// Problems of one service built from our Dockerfile: what it runs and the variables it sets.
fn check_built_service(name: &str, spec: &Hash) -> Vec<String> {
    let mut problems = Vec::new();
    if spec.contains_key(&key("env_file")) {
        problems.push(format!("{name}: `env_file` cannot be checked; configure with `environment:` only"));
    }
    let argv = match service_argv(spec) {
        Ok(argv) if argv.is_empty() => {
            problems.push(format!("{name}: no `command`/`entrypoint`: say which binary it runs"));
            return problems;
        }
        Ok(argv) => argv,
        Err(e) => {
            problems.push(format!("{name}: {e}"));
            return problems;
        }
    };
    let resolved = match resolve(&argv) {
        Ok(resolved) => resolved,
        Err(e) => {
            problems.push(format!("{name}: {e}"));
            return problems;
        }
    };
    let known = resolved.env();
    match environment_keys(spec) {
        Ok(keys) => {
            for unknown in keys.difference(&known) {
                problems.push(format!(
                    "{name}: `{}` does not read {unknown} (it reads: {})",
                    resolved.invocation(),
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        Err(e) => problems.push(format!("{name}: {e}")),
    }
    problems
}

#[test]
fn services_built_here_run_our_binaries_with_known_subcommands_options_and_env() {
    let compose = compose();
    let mut problems = Vec::new();
    let mut run = BTreeSet::new();
    for (name, spec) in services(&compose) {
        match built_here(&spec) {
            Ok(false) => {
                if !spec.contains_key(&key("image")) {
                    problems.push(format!("{name}: neither `image` nor `build`"));
                }
            }
            Ok(true) => {
                run.extend(service_binary(&spec));
                problems.extend(check_built_service(&name, &spec));
            }
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    for bin in OURS {
        if !run.contains(bin) {
            problems.push(format!("no service runs {bin}"));
        }
    }
    report(problems);
}

#[test]
fn healthchecks_running_our_binaries_use_known_subcommands_and_options() {
    let compose = compose();
    let mut problems = Vec::new();
    for (name, spec) in services(&compose) {
        if !built_here(&spec).unwrap_or(false) {
            continue;
        }
        let Some(test) =
            spec.get(&key("healthcheck")).and_then(Yaml::as_hash).and_then(|h| h.get(&key("test")))
        else {
            continue;
        };
        let argv = match argv(test, "healthcheck.test") {
            Ok(argv) => argv,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        // ["CMD", program, args…]; CMD-SHELL strings and NONE are not parsed.
        let Some(("CMD", program)) = argv.split_first().map(|(form, rest)| (form.as_str(), rest)) else {
            continue;
        };
        let is_ours = program.first().is_some_and(|p| OURS.contains(&p.rsplit('/').next().unwrap_or(p)));
        if is_ours && let Err(e) = resolve(program) {
            problems.push(format!("{name}: healthcheck: {e}"));
        }
    }
    report(problems);
}

#[test]
fn the_dockerfile_builds_and_installs_every_binary_compose_runs() {
    let path = repo_file("Dockerfile");
    let dockerfile = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut problems = Vec::new();
    for (name, spec) in services(&compose()) {
        if !built_here(&spec).unwrap_or(false) {
            continue;
        }
        let Some(bin) = service_binary(&spec) else { continue };
        // Each binary is its package's name; built with `-p`, copied from target/release.
        for needle in [format!("-p {bin}"), format!("target/release/{bin}")] {
            if !dockerfile.contains(&needle) {
                problems.push(format!("{name} runs {bin}, but the Dockerfile has no `{needle}`"));
            }
        }
    }
    report(problems);
}

/// The check itself: a variable no binary reads, an unknown subcommand and an unknown option are
/// each reported, and a valid service passes.
#[test]
fn the_check_rejects_unknown_variables_subcommands_and_options() {
    let compose = load_compose(
        r#"
services:
  good:
    build: .
    command: callback-service serve
    environment:
      RECHECK_AMQP_URL: amqp://rabbitmq
  bogus-env:
    build: .
    command: ["callback-service", "serve"]
    environment: ["RECHECK_AMQP_URL=amqp://rabbitmq", "RECHECK_NO_SUCH_SETTING=1"]
  admin-env-on-serve:
    build: .
    command: ["callback-service"]
    environment: { RECHECK_ADMIN_ADDR: "http://callback:50051" }
  bogus-subcommand:
    build: .
    command: ["callback-service", "no-such-subcommand"]
  bogus-option:
    build: .
    command: ["callback-service", "admin", "--no-such-option", "stats"]
"#,
    );
    let problems: BTreeMap<String, Vec<String>> = services(&compose)
        .into_iter()
        .map(|(name, spec)| {
            let problems = check_built_service(&name, &spec);
            (name, problems)
        })
        .collect();
    assert_eq!(problems["good"], Vec::<String>::new());
    let expect = [
        ("bogus-env", "does not read RECHECK_NO_SUCH_SETTING"),
        ("admin-env-on-serve", "does not read RECHECK_ADMIN_ADDR"),
        ("bogus-subcommand", "takes no argument `no-such-subcommand`"),
        ("bogus-option", "has no option `--no-such-option`"),
    ];
    for (service, message) in expect {
        assert!(
            problems[service].len() == 1 && problems[service][0].contains(message),
            "{service}: expected one problem containing {message:?}, got {:?}",
            problems[service]
        );
    }
    // Options of `admin` combine with its subcommands; the top level's (serve's) do not.
    let admin = resolve(&["callback-service".into(), "admin".into(), "stats".into()]).unwrap();
    assert!(admin.env().contains("RECHECK_ADMIN_ADDR"), "{:?}", admin.env());
    assert!(!admin.env().contains("RECHECK_AMQP_URL"), "{:?}", admin.env());
}
