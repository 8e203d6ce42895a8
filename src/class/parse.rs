use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Error, SecretProviderClass};

const GROUP: &str = "secrets-store.csi.x-k8s.io";
const KIND: &str = "SecretProviderClass";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: Option<Spec>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct Spec {
    provider: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, serde_norway::Value>,
}

/// Parses every SecretProviderClass in a (multi-document) YAML text. Documents of other kinds
/// are skipped; a class with a missing name, provider, unknown apiVersion or a non-scalar
/// parameter is an error. A class without `metadata.namespace` lives in `default`.
pub fn parse_documents(text: &str) -> Result<Vec<SecretProviderClass>, Error> {
    let mut out = Vec::new();
    for de in serde_norway::Deserializer::from_str(text) {
        let value =
            serde_norway::Value::deserialize(de).map_err(|e| Error::Invalid(e.to_string()))?;
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let doc: Document =
            serde_norway::from_value(value).map_err(|e| Error::Invalid(e.to_string()))?;
        if doc.kind.as_deref() != Some(KIND) {
            continue;
        }
        out.push(convert(doc)?);
    }
    Ok(out)
}

fn convert(doc: Document) -> Result<SecretProviderClass, Error> {
    let api = doc.api_version.unwrap_or_default();
    if api != format!("{GROUP}/v1") && api != format!("{GROUP}/v1alpha1") {
        return Err(Error::Invalid(format!(
            "apiVersion {api:?} is not {GROUP}/v1 or {GROUP}/v1alpha1"
        )));
    }
    class_from(doc.metadata, doc.spec)
}

/// A class as the Kubernetes API returns it: its metadata and its `spec` (JSON).
pub fn from_api_object(
    namespace: Option<String>,
    name: Option<String>,
    spec: Option<&serde_json::Value>,
) -> Result<SecretProviderClass, Error> {
    let spec = spec
        .map(|s| Spec::deserialize(s).map_err(|e| Error::Invalid(format!("spec: {e}"))))
        .transpose()?;
    class_from(Metadata { name, namespace }, spec)
}

fn class_from(metadata: Metadata, spec: Option<Spec>) -> Result<SecretProviderClass, Error> {
    let name = non_empty(metadata.name, "metadata.name")?;
    let spec = spec.ok_or_else(|| Error::Invalid(format!("class {name}: spec is required")))?;
    let provider = non_empty(spec.provider, "spec.provider")
        .map_err(|e| Error::Invalid(format!("class {name}: {e}")))?;
    let mut parameters = BTreeMap::new();
    for (key, value) in spec.parameters {
        let text = match value {
            serde_norway::Value::String(s) => s,
            serde_norway::Value::Bool(b) => b.to_string(),
            serde_norway::Value::Number(n) => n.to_string(),
            serde_norway::Value::Null => String::new(),
            _ => {
                return Err(Error::Invalid(format!(
                    "class {name}: spec.parameters.{key} must be a string"
                )));
            }
        };
        parameters.insert(key, text);
    }
    Ok(SecretProviderClass {
        namespace: metadata
            .namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string()),
        name,
        provider,
        parameters,
    })
}

fn non_empty(v: Option<String>, field: &str) -> Result<String, Error> {
    match v {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Error::Invalid(format!("{field} is required"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_and_v1alpha1_and_skips_other_kinds() {
        let text = r#"
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: db
  namespace: shop
spec:
  provider: vault
  parameters:
    roleName: shop
    objects: |
      - objectName: password
    usePodIdentity: false
    port: 8200
---
apiVersion: v1
kind: ConfigMap
metadata: {name: other}
---
apiVersion: secrets-store.csi.x-k8s.io/v1alpha1
kind: SecretProviderClass
metadata: {name: legacy}
spec: {provider: azure}
---
"#;
        let classes = parse_documents(text).expect("parse");
        assert_eq!(classes.len(), 2);
        let db = &classes[0];
        assert_eq!((db.namespace.as_str(), db.name.as_str()), ("shop", "db"));
        assert_eq!(db.provider, "vault");
        assert_eq!(db.parameters["roleName"], "shop");
        assert_eq!(db.parameters["objects"], "- objectName: password\n");
        assert_eq!(db.parameters["usePodIdentity"], "false");
        assert_eq!(db.parameters["port"], "8200");
        assert_eq!(classes[1].namespace, "default");
        assert!(classes[1].parameters.is_empty());
    }

    #[test]
    fn rejects_bad_classes_with_the_field_named() {
        let cases = [
            (
                "apiVersion: v9\nkind: SecretProviderClass\nmetadata: {name: a}\nspec: {provider: p}",
                "apiVersion",
            ),
            (
                "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {}\nspec: {provider: p}",
                "metadata.name",
            ),
            (
                "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: a}\nspec: {}",
                "spec.provider",
            ),
            (
                "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: a}",
                "spec is required",
            ),
            (
                "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: a}\nspec: {provider: p, parameters: {x: [1]}}",
                "spec.parameters.x",
            ),
            ("kind: [unclosed", ""),
        ];
        for (text, field) in cases {
            let err = parse_documents(text).expect_err(text).to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }
}
