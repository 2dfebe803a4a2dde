//! Object-store options from systemd credentials (`LoadCredential=`,
//! `$CREDENTIALS_DIRECTORY`), so that store keys need not be in the config file nor
//! in the unit's environment.
//!
//! A credential whose name is an `[object_store.options]` key of the store's
//! backend — `aws_*` for `s3://`, `google_*` for `gs://`, `azure_*` for `az://` —
//! is that option, its value the file's content (a trailing newline dropped):
//!
//! ```text
//! LoadCredential=aws_secret_access_key:/etc/idallocd/credentials/aws_secret_access_key
//! ```
//!
//! Other credentials (a TLS key, say) are left alone. A key given both in the
//! config file and as a credential is refused, naming both: which one wins would
//! be a guess.

use std::path::Path;

use super::config::ConfigError;

/// The option-name prefix of the backend a store URL names, if it takes options.
fn prefix_of(store_url: &str) -> Option<&'static str> {
    let scheme = store_url.split_once("://")?.0.to_ascii_lowercase();
    match scheme.as_str() {
        "s3" | "s3a" => Some("aws_"),
        "gs" => Some("google_"),
        "az" | "azure" | "abfs" | "abfss" => Some("azure_"),
        _ => None,
    }
}

/// The options `dir` (systemd's `$CREDENTIALS_DIRECTORY`) holds for the store at
/// `store_url`, in name order. `configured` are the config file's options.
pub fn store_options(
    dir: Option<&Path>,
    store_url: &str,
    configured: &[(String, String)],
) -> Result<Vec<(String, String)>, ConfigError> {
    let (Some(dir), Some(prefix)) = (dir, prefix_of(store_url)) else {
        return Ok(Vec::new());
    };
    let invalid = |reason: String| ConfigError::Invalid {
        key: "object_store.options",
        reason,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| {
        invalid(format!(
            "cannot read $CREDENTIALS_DIRECTORY {}: {e}",
            dir.display()
        ))
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            invalid(format!(
                "cannot read $CREDENTIALS_DIRECTORY {}: {e}",
                dir.display()
            ))
        })?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.to_ascii_lowercase().starts_with(prefix) {
            names.push(name);
        }
    }
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let key = name.to_ascii_lowercase();
        let path = dir.join(&name);
        if configured.iter().any(|(k, _)| k.eq_ignore_ascii_case(&key)) {
            return Err(invalid(format!(
                "{key} is set in the config file and as the credential {}; keep one",
                path.display()
            )));
        }
        let value = std::fs::read_to_string(&path).map_err(|e| {
            invalid(format!(
                "{key}: cannot read the credential {}: {e}",
                path.display()
            ))
        })?;
        let value = value.strip_suffix('\n').unwrap_or(&value);
        let value = value.strip_suffix('\r').unwrap_or(value);
        out.push((key, value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(d.path().join(name), body).unwrap();
        }
        d
    }

    #[test]
    fn credentials_named_after_the_backends_options_are_options() {
        let d = dir_with(&[
            ("aws_secret_access_key", "s3cr3t\n"),
            ("aws_access_key_id", "AKIA"),
            ("server.key", "not an option"),
            ("google_service_account_key", "{}"),
        ]);
        let got = store_options(Some(d.path()), "s3://bucket/db1", &[]).unwrap();
        assert_eq!(
            got,
            vec![
                ("aws_access_key_id".to_string(), "AKIA".to_string()),
                ("aws_secret_access_key".to_string(), "s3cr3t".to_string()),
            ]
        );
        let got = store_options(Some(d.path()), "gs://bucket", &[]).unwrap();
        assert_eq!(
            got,
            vec![("google_service_account_key".into(), "{}".into())]
        );
        // No directory, or a store without options: nothing.
        assert!(store_options(None, "s3://bucket", &[]).unwrap().is_empty());
        assert!(store_options(Some(d.path()), "file:///srv/ids", &[])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_key_in_both_places_is_refused_naming_both() {
        let d = dir_with(&[("aws_secret_access_key", "a")]);
        let configured = vec![("AWS_SECRET_ACCESS_KEY".to_string(), "b".to_string())];
        let e = store_options(Some(d.path()), "s3://bucket", &configured)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`object_store.options`: aws_secret_access_key is set in the config file")
                && e.contains("keep one")
                && e.contains(&d.path().display().to_string()),
            "{e}"
        );
    }
}
