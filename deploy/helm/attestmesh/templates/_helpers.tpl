{{/*
Names, labels and the pieces every workload shares. The NATS permission sets live in
_nats_permissions.tpl, the attestmesh pod template in _service_pod.tpl.
*/}}

{{- define "attestmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "attestmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "attestmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels shared by every object; a component label is added per workload. */}}
{{- define "attestmesh.labels" -}}
helm.sh/chart: {{ include "attestmesh.chart" . }}
app.kubernetes.io/name: {{ include "attestmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: attestmesh
{{- end -}}

{{- define "attestmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "attestmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The image reference: digest wins over tag, tag defaults to appVersion. */}}
{{- define "attestmesh.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "attestmesh.natsName" -}}
{{- printf "%s-nats" (include "attestmesh.fullname" .) -}}
{{- end -}}

{{- define "attestmesh.natsTlsSecret" -}}
{{- default (printf "%s-nats-tls" (include "attestmesh.fullname" .)) .Values.nats.tls.secretName -}}
{{- end -}}

{{/* The URL services connect to: the client Service, over TLS when it is on. */}}
{{- define "attestmesh.natsUrl" -}}
{{- printf "%s://%s.%s.svc:4222" (ternary "tls" "nats" .Values.nats.tls.enabled) (include "attestmesh.natsName" .) .Release.Namespace -}}
{{- end -}}

{{/* A container security context that drops everything. */}}
{{- define "attestmesh.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A subject token as the services accept it (services/mesh/subjects.py). */}}
{{- define "attestmesh.checkToken" -}}
{{- if not (regexMatch "^[A-Za-z0-9_-]{1,64}$" .value) -}}
{{- fail (printf "attestmesh: %s %q is not a valid NATS subject token ([A-Za-z0-9_-]{1,64})" .what .value) -}}
{{- end -}}
{{- end -}}

{{/* Fail with a pointer to the generator when an identity's public nkey is missing. */}}
{{- define "attestmesh.requireNkey" -}}
{{- if not (regexMatch "^U[A-Z2-7]{55}$" (default "" .value)) -}}
{{- fail (printf "attestmesh: %s must be the NATS user nkey (U..., 56 characters) of identity %q; generate identities with deploy/gen-identities.py" .key .identity) -}}
{{- end -}}
{{- .value -}}
{{- end -}}

{{/*
The NATS identities this release runs, as a JSON object: identity -> public nkey.
Per-node collector identities are named node-<node>.
*/}}
{{- define "attestmesh.identities" -}}
{{- $ids := dict -}}
{{- range $family := .Values.verifier.families -}}
{{- $key := printf "natsUsers.verifiers.%s" $family -}}
{{- $_ := set $ids (printf "verifier-%s" $family) (include "attestmesh.requireNkey" (dict "value" (get $.Values.natsUsers.verifiers $family) "key" $key "identity" (printf "verifier-%s" $family))) -}}
{{- end -}}
{{- $_ := set $ids "policy" (include "attestmesh.requireNkey" (dict "value" .Values.natsUsers.policy "key" "natsUsers.policy" "identity" "policy")) -}}
{{- $_ := set $ids "broker" (include "attestmesh.requireNkey" (dict "value" .Values.natsUsers.broker "key" "natsUsers.broker" "identity" "broker")) -}}
{{- if .Values.collector.enabled -}}
{{- if not .Values.collector.nodeIdentities.nodes -}}
{{- fail "attestmesh: collector.enabled needs collector.nodeIdentities.nodes (one NATS user per node; issue them with `attestmesh node enroll NAME --config FILE --out DIR` or deploy/gen-identities.py --collector-nodes)" -}}
{{- end -}}
{{- range $node, $nkey := .Values.collector.nodeIdentities.nodes -}}
{{- include "attestmesh.checkToken" (dict "what" "collector node" "value" $node) -}}
{{- $_ := set $ids (printf "node-%s" $node) (include "attestmesh.requireNkey" (dict "value" $nkey "key" (printf "collector.nodeIdentities.nodes.%s" $node) "identity" (printf "node-%s" $node))) -}}
{{- end -}}
{{- end -}}
{{- if .Values.natsUsers.admin -}}
{{- $_ := set $ids "admin" (include "attestmesh.requireNkey" (dict "value" .Values.natsUsers.admin "key" "natsUsers.admin" "identity" "admin")) -}}
{{- end -}}
{{- toJson $ids -}}
{{- end -}}

{{/* The services' config.json (services/mesh/config.py `Config`). */}}
{{- define "attestmesh.configJson" -}}
{{- $c := dict
  "nats_url" (include "attestmesh.natsUrl" .)
  "nats_nkey_seed_file" "/run/attestmesh/nats/user.nk"
  "data_dir" "/run/attestmesh/data"
  "keys_dir" "/run/attestmesh/keys"
  "roots_dir" "/etc/attestmesh/roots"
  "offline" .Values.config.offline
  "nonce_ttl_s" .Values.config.nonce_ttl_s
  "decision_ttl_s" .Values.config.decision_ttl_s
  "verdict_ttl_s" .Values.config.verdict_ttl_s
  "reattest_interval_s" .Values.config.reattest_interval_s
  "max_deliver" .Values.config.max_deliver
  "ack_wait_s" .Values.config.ack_wait_s
  "jetstream_replicas" (ternary 3 1 (ge (int .Values.nats.replicas) 3))
  "allow_warning" .Values.config.allow_warning
  "log_level" .Values.config.log_level
  "health_file" "/tmp/attestmesh-health"
-}}
{{- if .Values.collateral.existingConfigMap -}}
{{- $_ := set $c "collateral_dir" "/etc/attestmesh/collateral" -}}
{{- end -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $c "metrics_port" (int .Values.metrics.port) -}}
{{- $_ := set $c "metrics_host" "0.0.0.0" -}}
{{- end -}}
{{- toPrettyJson $c -}}
{{- end -}}
