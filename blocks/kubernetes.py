"""Kubernetes cluster Block: a kubeconfig (a secret) or the pod's service account, a context, a namespace."""

from __future__ import annotations

from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from blocks._reference import REFERENCEABLE
from blocks.errors import ConfigurationError


class KubernetesCluster(Block):
    """Where a Kubernetes API server is and how to authenticate to it."""

    model_config = REFERENCEABLE
    _block_type_name = "Kubernetes Cluster"
    _description = "A Kubernetes cluster: kubeconfig content (secret) or in-cluster service account; namespace."

    kubeconfig: SecretStr | None = Field(default=None, description="The kubeconfig file's content (YAML). "
                                                                   "Empty: the pod's service account (in-cluster).")
    context: str | None = Field(default=None, description="kubeconfig context; empty: its current-context.")
    namespace: str = Field(default="default", description="Namespace of the objects the runbooks touch.")

    def describe(self) -> str:
        """The cluster's server URL and namespace (no credentials)."""
        if self.kubeconfig is None:
            return f"in-cluster/{self.namespace}"
        try:
            config = yaml.safe_load(self.kubeconfig.get_secret_value()) or {}
            context_name = self.context or config.get("current-context")
            context = next(c["context"] for c in config.get("contexts", []) if c.get("name") == context_name)
            server = next(c["cluster"]["server"] for c in config.get("clusters", [])
                          if c.get("name") == context.get("cluster"))
        except (yaml.YAMLError, StopIteration, KeyError, TypeError, AttributeError):
            server = "(unreadable kubeconfig)"
        return f"{server}/{self.namespace}"

    def get_client(self) -> k8s.ApiClient:
        """The official client's ApiClient; the kubeconfig is read only here and never logged."""
        configuration = k8s.Configuration()
        if self.kubeconfig is None:
            try:
                k8s_config.load_incluster_config(client_configuration=configuration)
            except k8s_config.ConfigException as exc:
                raise ConfigurationError(f"no kubeconfig given and no in-cluster service account ({exc}): "
                                         "set the Block's kubeconfig") from None
            return k8s.ApiClient(configuration)
        try:
            config: Any = yaml.safe_load(self.kubeconfig.get_secret_value())
        except yaml.YAMLError:
            raise ConfigurationError("the Block's kubeconfig is not valid YAML") from None
        if not isinstance(config, dict):
            raise ConfigurationError("the Block's kubeconfig is not a kubeconfig mapping")
        try:
            k8s_config.load_kube_config_from_dict(config, context=self.context, client_configuration=configuration,
                                                  persist_config=False)
        except k8s_config.ConfigException as exc:
            # the loader's messages name contexts and fields, never credential values
            raise ConfigurationError(f"kubeconfig rejected: {str(exc)[:300]}") from None
        return k8s.ApiClient(configuration)

    def apps(self) -> k8s.AppsV1Api:
        return k8s.AppsV1Api(self.get_client())

    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.get_client())
