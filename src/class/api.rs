use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};

use super::{ClassSource, Error, Lookup, SecretProviderClass, parse};

const GROUP: &str = "secrets-store.csi.x-k8s.io";
/// How long one direct GET on a cache miss may take before the publish fails `Unavailable`.
const GET_TIMEOUT: Duration = Duration::from_secs(10);

/// A Kubernetes API client: from `kubeconfig` when given, else inferred (`KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes API configuration: {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes API client: {e}"))
}

fn resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, version, "SecretProviderClass"),
        "secretproviderclasses",
    )
}

/// Cluster mode: classes from the Kubernetes API (`secrets-store.csi.x-k8s.io` v1, falling back
/// to v1alpha1). A watch-backed cache of every class answers lookups without calling the API
/// server; a class the cache has not seen yet (created just before its pod) is fetched directly.
pub struct ApiSource {
    client: kube::Client,
    versions: [ApiResource; 2],
    cache: Store<DynamicObject>,
}

impl ApiSource {
    /// Starts watching classes in every namespace (on the current tokio runtime).
    pub fn start(client: kube::Client) -> ApiSource {
        let v1 = resource("v1");
        let writer = reflector::store::Writer::new(v1.clone());
        let cache = writer.as_reader();
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &v1);
        tokio::spawn(async move {
            let events = reflector::reflector(
                writer,
                watcher(all, watcher::Config::default()).default_backoff(),
            );
            let mut events = std::pin::pin!(events);
            let mut failing = false;
            while let Some(event) = events.next().await {
                match event {
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "watching SecretProviderClasses failed; lookups go to the API server until it recovers");
                    }
                    Err(_) => {}
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("watching SecretProviderClasses again");
                    }
                    Ok(_) => {}
                }
            }
        });
        ApiSource {
            client,
            versions: [v1, resource("v1alpha1")],
            cache,
        }
    }

    async fn find(&self, namespace: &str, name: &str) -> Result<SecretProviderClass, Error> {
        let key = ObjectRef::new_with(name, self.versions[0].clone()).within(namespace);
        if let Some(obj) = self.cache.get(&key) {
            return convert(&obj);
        }
        for version in &self.versions {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), namespace, version);
            let found = tokio::time::timeout(GET_TIMEOUT, api.get_opt(name))
                .await
                .map_err(|_| {
                    Error::Unavailable(format!(
                        "Kubernetes API: no answer for SecretProviderClass {namespace}/{name} within {GET_TIMEOUT:?}"
                    ))
                })?
                .map_err(|e| {
                    Error::Unavailable(format!(
                        "Kubernetes API: SecretProviderClass {namespace}/{name}: {e}"
                    ))
                })?;
            if let Some(obj) = found {
                return convert(&obj);
            }
        }
        Err(Error::NotFound {
            namespace: namespace.to_string(),
            name: name.to_string(),
            hint: String::new(),
        })
    }
}

fn convert(obj: &DynamicObject) -> Result<SecretProviderClass, Error> {
    parse::from_api_object(
        obj.metadata.namespace.clone(),
        obj.metadata.name.clone(),
        obj.data.get("spec"),
    )
}

impl ClassSource for ApiSource {
    fn lookup<'a>(&'a self, namespace: &'a str, name: &'a str) -> Lookup<'a> {
        Box::pin(self.find(namespace, name))
    }
}
