{{/*
The pod template of every attestmesh service (verifier, policy, broker, collector).

Why an init container copies the keys: Kubernetes projects Secret files as root-owned, and
with an fsGroup it adds group-read to them. The services refuse key files that are group-
or world-readable (SigningKey.load_or_create) and the broker also refuses a sealing key it
does not own (KeyFileSource), so a Secret cannot be mounted where they read. The init
container, running as the service's own uid, copies the material into a memory-backed
emptyDir as 0400 files in 0700 directories it owns; the service container mounts that
directory read-only and never sees the Secret volume itself. Missing material stops the
pod instead of letting a service invent a key of its own.

Arguments (a dict): root, component, identity, args (list), signing (bool), trusted (list of
identity names whose public keys this service accepts), sealing (bool), hostSeed (path on
the host holding the NATS seed instead of the identity's Secret), writable (bool: the
runtime directory stays writable, for the simulated collector's test PKI), roots (bool),
resources, nodeSelector, tolerations, affinity, devices (list of host paths to mount at the
same place, {name, path, type}), extraLabels (dict), extraEnv (list of {name, value}),
sealingSecret ({name, key}: the broker's sealing key read in place from that Secret, mounted
read-only on the service container alone at /etc/attestmesh/sealing; see the broker's
sealing.source and services/broker/k8ssecret.py for what the broker accepts there).
*/}}
{{- define "attestmesh.servicePod" -}}
{{- $root := .root -}}
{{- $fullname := include "attestmesh.fullname" $root -}}
{{- $src := "/var/run/attestmesh-src" -}}
metadata:
  labels:
    {{- include "attestmesh.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    app.kubernetes.io/part-of: attestmesh
    attestmesh.io/identity: {{ .identity }}
    attestmesh.io/nats-client: "true"
    {{- with .extraLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- if $root.Values.metrics.enabled }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ $root.Values.metrics.port | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    checksum/config: {{ include "attestmesh.configJson" $root | sha256sum }}
    checksum/trusted-keys: {{ toJson $root.Values.trustedKeys | sha256sum }}
    {{- if $root.Values.secrets.create }}
    checksum/private: {{ toJson (get $root.Values.secrets.private .identity) | sha256sum }}
    {{- end }}
spec:
  automountServiceAccountToken: false
  serviceAccountName: {{ $fullname }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: 30
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ $root.Values.runAs.user }}
    runAsGroup: {{ $root.Values.runAs.group }}
    fsGroup: {{ $root.Values.runAs.group }}
    {{- if and .devices $root.Values.collector.deviceGroup }}
    supplementalGroups: [{{ $root.Values.collector.deviceGroup }}]
    {{- end }}
    seccompProfile:
      type: RuntimeDefault
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  initContainers:
    - name: install-keys
      image: {{ include "attestmesh.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["/bin/sh", "-c"]
      args:
        - |
          set -eu
          umask 077
          src={{ $src }}
          dst=/run/attestmesh
          need() { [ -s "$1" ] || { echo "install-keys: $1 is missing or empty" >&2; exit 1; }; }
          put() { need "$1"; install -m 0400 "$1" "$2"; }
          mkdir -p "$dst/nats" "$dst/keys/trusted" "$dst/data"
          chmod 0700 "$dst/nats" "$dst/keys" "$dst/keys/trusted" "$dst/data"
          {{- if .hostSeed }}
          put "$src/host/nats.seed" "$dst/nats/user.nk"
          {{- else }}
          put "$src/identity/nats.seed" "$dst/nats/user.nk"
          {{- end }}
          {{- if .signing }}
          put "$src/identity/signing.key" "$dst/keys/{{ .identity }}.key"
          {{- end }}
          {{- range .trusted }}
          put "$src/trusted/{{ . }}.pem" "$dst/keys/trusted/{{ . }}.pem"
          {{- end }}
          {{- if .sealing }}
          put "$src/identity/broker-sealing.key" "$dst/data/broker-sealing.key"
          {{- end }}
      securityContext:
        {{- include "attestmesh.containerSecurityContext" $root | nindent 8 }}
      resources:
        requests: {cpu: 10m, memory: 16Mi}
        limits: {cpu: 100m, memory: 32Mi}
      volumeMounts:
        - {name: runtime, mountPath: /run/attestmesh}
        {{- if not .hostSeed }}
        - {name: identity, mountPath: {{ $src }}/identity, readOnly: true}
        {{- else }}
        - {name: host-seed, mountPath: {{ $src }}/host/nats.seed, readOnly: true}
        {{- end }}
        {{- if .trusted }}
        - {name: trusted, mountPath: {{ $src }}/trusted, readOnly: true}
        {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "attestmesh.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args:
        {{- toYaml .args | nindent 8 }}
      env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        - name: POD_NAMESPACE
          valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
        - name: NODE_NAME
          valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
        - name: OTEL_RESOURCE_ATTRIBUTES
          value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),k8s.node.name=$(NODE_NAME),service.namespace=attestmesh"
        {{- with $root.Values.otel.endpoint }}
        - name: OTEL_EXPORTER_OTLP_ENDPOINT
          value: {{ . | quote }}
        - name: OTEL_EXPORTER_OTLP_PROTOCOL
          value: {{ $root.Values.otel.protocol | quote }}
        {{- end }}
        {{- if $root.Values.nats.tls.enabled }}
        # The cluster CA, so the default TLS context verifies the NATS server.
        - name: SSL_CERT_FILE
          value: /etc/attestmesh/nats-ca/ca.crt
        {{- end }}
        - name: PYTHONDONTWRITEBYTECODE
          value: "1"
        - name: HOME
          value: /tmp
        {{- range .extraEnv }}
        - {name: {{ .name }}, value: {{ .value | quote }}}
        {{- end }}
      {{- if $root.Values.metrics.enabled }}
      ports:
        - {name: metrics, containerPort: {{ $root.Values.metrics.port }}, protocol: TCP}
      {{- end }}
      # The service touches /tmp/attestmesh-health while connected to NATS (config
      # health_file); a process that loses the bus or wedges stops touching it.
      startupProbe:
        exec: {command: ["attestmesh", "health", "--file", "/tmp/attestmesh-health", "--max-age", "30"]}
        periodSeconds: 5
        failureThreshold: 24
      livenessProbe:
        exec: {command: ["attestmesh", "health", "--file", "/tmp/attestmesh-health", "--max-age", "60"]}
        periodSeconds: 20
        timeoutSeconds: 10
        failureThreshold: 3
      securityContext:
        {{- include "attestmesh.containerSecurityContext" $root | nindent 8 }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      volumeMounts:
        - {name: config, mountPath: /etc/attestmesh/config, readOnly: true}
        - {name: runtime, mountPath: /run/attestmesh, readOnly: {{ not .writable }}}
        - {name: tmp, mountPath: /tmp}
        {{- if $root.Values.nats.tls.enabled }}
        - {name: nats-ca, mountPath: /etc/attestmesh/nats-ca, readOnly: true}
        {{- end }}
        {{- if .roots }}
        - {name: roots, mountPath: /etc/attestmesh/roots, readOnly: true}
        {{- if $root.Values.collateral.existingConfigMap }}
        - {name: collateral, mountPath: /etc/attestmesh/collateral, readOnly: true}
        {{- end }}
        {{- end }}
        {{- range .devices }}
        - {name: {{ .name }}, mountPath: {{ .path }}}
        {{- end }}
        {{- if .sealingSecret }}
        - {name: sealing-key, mountPath: /etc/attestmesh/sealing, readOnly: true}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ $fullname }}-config
    - name: runtime
      emptyDir:
        medium: Memory
        sizeLimit: 1Mi
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if not .hostSeed }}
    - name: identity
      secret:
        secretName: {{ $fullname }}-{{ .identity }}
        defaultMode: 0440
        items:
          - {key: nats.seed, path: nats.seed}
          {{- if .signing }}
          - {key: signing.key, path: signing.key}
          {{- end }}
          {{- if .sealing }}
          - {key: broker-sealing.key, path: broker-sealing.key}
          {{- end }}
    {{- else }}
    - name: host-seed
      hostPath:
        path: {{ .hostSeed }}
        type: File
    {{- end }}
    {{- if .trusted }}
    - name: trusted
      secret:
        secretName: {{ $fullname }}-trusted-keys
        defaultMode: 0440
        items:
          {{- range .trusted }}
          - {key: {{ . }}.pem, path: {{ . }}.pem}
          {{- end }}
    {{- end }}
    {{- with .sealingSecret }}
    - name: sealing-key
      secret:
        secretName: {{ .name }}
        defaultMode: 0400
        items:
          - {key: {{ .key }}, path: broker-sealing.key}
    {{- end }}
    {{- if $root.Values.nats.tls.enabled }}
    - name: nats-ca
      secret:
        secretName: {{ include "attestmesh.natsTlsSecret" $root }}
        defaultMode: 0444
        items:
          - {key: ca.crt, path: ca.crt}
    {{- end }}
    {{- if .roots }}
    {{- $items := list }}
    {{- range $key, $file := $root.Values.trustRoots.files }}
    {{- if or $file.pem $root.Values.trustRoots.existingConfigMap }}
    {{- $items = append $items (dict "key" $key "path" $file.path) }}
    {{- end }}
    {{- end }}
    - name: roots
      configMap:
        name: {{ default (printf "%s-trust-roots" $fullname) $root.Values.trustRoots.existingConfigMap }}
        # Roots that are not supplied are simply absent: their families fail closed.
        optional: true
        {{- with $items }}
        items:
          {{- toYaml . | nindent 10 }}
        {{- end }}
    {{- if $root.Values.collateral.existingConfigMap }}
    - name: collateral
      configMap:
        name: {{ $root.Values.collateral.existingConfigMap }}
    {{- end }}
    {{- end }}
    {{- range .devices }}
    - name: {{ .name }}
      hostPath:
        path: {{ .path }}
        type: {{ .type }}
    {{- end }}
{{- end -}}
