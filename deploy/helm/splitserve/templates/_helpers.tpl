{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "splitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name prefix; kept short enough for "-gateway-metrics" style suffixes. */}}
{{- define "splitserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "splitserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The RayCluster's name (also what the planner patches). */}}
{{- define "splitserve.rayClusterName" -}}
{{- include "splitserve.fullname" . }}
{{- end }}

{{/* Labels --------------------------------------------------------------------------------------
Call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "splitserve.labels" -}}
helm.sh/chart: {{ include "splitserve.chart" .ctx }}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/part-of: splitserve
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/* Labels every pod of the release carries (NetworkPolicies admit peers by them). */}}
{{- define "splitserve.releaseSelector" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Images -------------------------------------------------------------------------------------- */}}

{{- define "splitserve.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{ $img.repository }}@{{ $img.digest }}
{{- else -}}
{{ $img.repository }}:{{ default (printf "%s-%s" .Chart.AppVersion .Values.engine.device) $img.tag }}
{{- end -}}
{{- end }}

{{- define "splitserve.redisImage" -}}
{{- $img := .Values.redis.internal.image -}}
{{- if $img.digest -}}
{{ $img.repository }}@{{ $img.digest }}
{{- else -}}
{{ $img.repository }}:{{ $img.tag }}
{{- end -}}
{{- end }}

{{- define "splitserve.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Redis --------------------------------------------------------------------------------------- */}}

{{- define "splitserve.redisServiceName" -}}
{{- printf "%s-redis" (include "splitserve.fullname" .) }}
{{- end }}

{{/* The Redis URL as clients use it; with a password Secret, "$(REDIS_PASSWORD)" stands in the
URL and Kubernetes expands it from the container's environment. */}}
{{- define "splitserve.redisUrl" -}}
{{- $url := "" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- $url = required "redis.mode=external needs redis.external.url" .Values.redis.external.url -}}
{{- else -}}
{{- $url = printf "%s://%s.%s.svc:6379/0" (ternary "rediss" "redis" (not (empty .Values.redis.tls.secretName))) (include "splitserve.redisServiceName" .) .Release.Namespace -}}
{{- end -}}
{{- if and .Values.redis.tls.secretName (not (hasPrefix "rediss://" $url)) -}}
{{- fail "redis.tls.secretName is set: redis.external.url must be a rediss:// URL" -}}
{{- end -}}
{{- if .Values.redis.passwordSecret.name -}}
{{- $url = regexReplaceAll "^(rediss?://)" $url "${1}:$(REDIS_PASSWORD)@" -}}
{{- end -}}
{{- $url -}}
{{- end }}

{{/* Environment giving a container SPLITSERVE_REDIS_URL (and REDIS_PASSWORD first, when set). */}}
{{- define "splitserve.redisEnv" -}}
{{- if .Values.redis.passwordSecret.name }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.passwordSecret.name }}
      key: {{ .Values.redis.passwordSecret.key }}
{{- end }}
- name: SPLITSERVE_REDIS_URL
  value: {{ include "splitserve.redisUrl" . | quote }}
{{- with .Values.redis.index.url }}
{{- if and $.Values.redis.tls.secretName (not (hasPrefix "rediss://" .)) }}
{{- fail "redis.tls.secretName is set: redis.index.url must be a rediss:// URL" }}
{{- end }}
- name: SPLITSERVE_REDIS_INDEX_URL
  value: {{ ternary (regexReplaceAll "^(rediss?://)" . "${1}:$(REDIS_PASSWORD)@") . (not (empty $.Values.redis.passwordSecret.name)) | quote }}
- name: SPLITSERVE_REDIS_INDEX_CLUSTER
  value: {{ $.Values.redis.index.cluster | quote }}
{{- end }}
{{- include "splitserve.redisTlsEnv" . }}
{{- end }}

{{/* Where Redis clients find the TLS files (redis.tls; router/redis_config.py). */}}
{{- define "splitserve.redisTlsEnv" -}}
{{- if .Values.redis.tls.secretName }}
- name: SPLITSERVE_REDIS_TLS_CA_FILE
  value: /var/run/secrets/splitserve/redis-tls/ca.crt
{{- if .Values.redis.tls.clientAuth }}
- name: SPLITSERVE_REDIS_TLS_CERT_FILE
  value: /var/run/secrets/splitserve/redis-tls/tls.crt
- name: SPLITSERVE_REDIS_TLS_KEY_FILE
  value: /var/run/secrets/splitserve/redis-tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{- define "splitserve.redisTlsMount" -}}
{{- if .Values.redis.tls.secretName }}
- name: redis-tls
  mountPath: /var/run/secrets/splitserve/redis-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "splitserve.redisTlsVolume" -}}
{{- if .Values.redis.tls.secretName }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* Where Ray's GCS keeps its state (rayCluster.gcsFaultTolerance): the address given, else this
chart's Redis as Ray takes it (redis[s]://host:port: no credentials, no database). */}}
{{- define "splitserve.gcsRedisAddress" -}}
{{- $ft := .Values.rayCluster.gcsFaultTolerance -}}
{{- if $ft.redisAddress -}}
{{- $ft.redisAddress -}}
{{- else if eq .Values.redis.mode "external" -}}
{{- $url := required "redis.mode=external needs redis.external.url" .Values.redis.external.url -}}
{{- regexReplaceAll "/[0-9]*$" (regexReplaceAll "^(rediss?://)[^@/]*@" $url "${1}") "" -}}
{{- else -}}
{{- printf "%s://%s.%s.svc:6379" (ternary "rediss" "redis" (not (empty .Values.redis.tls.secretName))) (include "splitserve.redisServiceName" .) .Release.Namespace -}}
{{- end -}}
{{- end }}

{{/* The TLS files of the GCS's Redis client (Ray's RAY_REDIS_* settings), when it uses this
chart's Redis over TLS. */}}
{{- define "splitserve.gcsRedisTlsEnv" -}}
{{- $ft := .Values.rayCluster.gcsFaultTolerance -}}
{{- if and $ft.enabled (not $ft.redisAddress) .Values.redis.tls.secretName }}
- name: RAY_REDIS_CA_CERT
  value: /var/run/secrets/splitserve/redis-tls/ca.crt
{{- if .Values.redis.tls.clientAuth }}
- name: RAY_REDIS_CLIENT_CERT
  value: /var/run/secrets/splitserve/redis-tls/tls.crt
- name: RAY_REDIS_CLIENT_KEY
  value: /var/run/secrets/splitserve/redis-tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* Cluster secret ------------------------------------------------------------------------------ */}}

{{/* The Secret holding the cluster secret: the operator's, else the chart's own. */}}
{{- define "splitserve.clusterSecretName" -}}
{{- default (printf "%s-cluster-secret" (include "splitserve.fullname" .)) .Values.clusterSecret.existingSecret -}}
{{- end }}

{{/* Where a container finds the cluster secret (a file: never in the environment). */}}
{{- define "splitserve.clusterSecretEnv" -}}
- name: SPLITSERVE_CLUSTER_SECRET_FILE
  value: /var/run/secrets/splitserve/cluster/secret
{{- end }}

{{- define "splitserve.clusterSecretMount" -}}
- name: cluster-secret
  mountPath: /var/run/secrets/splitserve/cluster
  readOnly: true
{{- end }}

{{- define "splitserve.clusterSecretVolume" -}}
- name: cluster-secret
  secret:
    secretName: {{ include "splitserve.clusterSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.clusterSecret.key }}
        path: secret
{{- end }}

{{/* Ray token authentication ---------------------------------------------------------------------- */}}

{{/* The Secret holding the Ray token: the operator's, else the chart's own. */}}
{{- define "splitserve.rayAuthSecretName" -}}
{{- default (printf "%s-ray-auth" (include "splitserve.fullname" .)) .Values.rayCluster.auth.existingSecret -}}
{{- end }}

{{/* Ray's authentication mode in every Ray container (head, worker groups; KubeRay copies the
worker container's environment and mounts into its wait-gcs-ready init container): the token from
a file, never in the environment. */}}
{{- define "splitserve.rayAuthEnv" -}}
{{- if .Values.rayCluster.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN_PATH
  value: /var/run/secrets/splitserve/ray/token
{{- else }}
# Ray's token authentication is off (rayCluster.auth.enabled): only this release's pods reach the
# Ray ports (networkPolicy.enabled).
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- end }}

{{- define "splitserve.rayAuthMount" -}}
{{- if .Values.rayCluster.auth.enabled }}
- name: ray-auth
  mountPath: /var/run/secrets/splitserve/ray
  readOnly: true
{{- end }}
{{- end }}

{{- define "splitserve.rayAuthVolume" -}}
{{- if .Values.rayCluster.auth.enabled }}
- name: ray-auth
  secret:
    secretName: {{ include "splitserve.rayAuthSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.rayCluster.auth.key }}
        path: token
{{- end }}
{{- end }}

{{/* Model --------------------------------------------------------------------------------------- */}}

{{/* What --model gets: a directory in the pod, or a hub id. */}}
{{- define "splitserve.modelPath" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "builtin" -}}
{{ $m.builtinPath }}
{{- else if eq $m.source "pvc" -}}
{{ printf "/models/%s" (required "model.source=pvc needs model.pvc.path" $m.pvc.path | trimPrefix "/") | trimSuffix "/" }}
{{- else -}}
{{ required "model.source=hub needs model.hub.id" $m.hub.id }}
{{- end -}}
{{- end }}

{{- define "splitserve.servedModelName" -}}
{{- default (include "splitserve.modelPath" .) .Values.model.servedModelName }}
{{- end }}

{{/* Environment every splitserve container shares: caches on the writable volumes, no telemetry,
the block-hash seed, offline hub access unless the model comes from the hub. */}}
{{- define "splitserve.logEnv" -}}
- name: SPLITSERVE_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
- name: SPLITSERVE_LOG_LEVEL
  value: {{ .Values.logging.level | quote }}
{{- if .Values.logging.otlpEndpoint }}
- name: SPLITSERVE_TRACING_OTLP_ENDPOINT
  value: {{ .Values.logging.otlpEndpoint | quote }}
{{- end }}
{{- end }}

{{- define "splitserve.commonEnv" -}}
{{ include "splitserve.logEnv" . }}
- name: PYTHONHASHSEED
  value: {{ .Values.serving.hashSeed | quote }}
- name: HOME
  value: /tmp
- name: SPLITSERVE_CACHE_DIR
  value: /var/cache/splitserve
- name: XDG_CACHE_HOME
  value: /var/cache/splitserve
- name: HF_HOME
  value: /var/cache/splitserve/huggingface
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: VLLM_NO_USAGE_STATS
  value: "1"
- name: DO_NOT_TRACK
  value: "1"
- name: HF_HUB_DISABLE_TELEMETRY
  value: "1"
{{- if ne .Values.model.source "hub" }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- else if .Values.model.hub.tokenSecret.name }}
- name: HF_TOKEN_PATH
  value: /var/run/secrets/splitserve/hf/token
{{- end }}
{{- end }}

{{/* Volumes of any pod that reads the model (weights or tokenizer) and writes caches. */}}
{{- define "splitserve.modelVolumes" -}}
- name: tmp
  emptyDir: {}
{{- if and (eq .Values.model.source "hub") .Values.model.hub.cacheClaimName }}
- name: cache
  persistentVolumeClaim:
    claimName: {{ .Values.model.hub.cacheClaimName }}
{{- else }}
- name: cache
  emptyDir: {}
{{- end }}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.source=pvc needs model.pvc.claimName" .Values.model.pvc.claimName }}
    readOnly: true
{{- end }}
{{- if and (eq .Values.model.source "hub") .Values.model.hub.tokenSecret.name }}
- name: hf-token
  secret:
    secretName: {{ .Values.model.hub.tokenSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.model.hub.tokenSecret.key }}
        path: token
{{- end }}
{{- end }}

{{- define "splitserve.modelVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/splitserve
{{- if eq .Values.model.source "pvc" }}
- name: model
  mountPath: /models
  readOnly: true
{{- end }}
{{- if and (eq .Values.model.source "hub") .Values.model.hub.tokenSecret.name }}
- name: hf-token
  mountPath: /var/run/secrets/splitserve/hf
  readOnly: true
{{- end }}
{{- end }}

{{/* Security ------------------------------------------------------------------------------------ */}}

{{- define "splitserve.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "splitserve.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* Serving ------------------------------------------------------------------------------------- */}}

{{/* Worker groups of the chosen mode, as a list of names. */}}
{{- define "splitserve.workerGroupNames" -}}
{{- if eq .Values.serving.mode "aggregated" -}}
both
{{- else -}}
prefill decode
{{- end -}}
{{- end }}

{{/* Checkov findings this chart accepts, with the reason (checkov reads these annotations).
Call with (dict "ctx" $ "extra" (list ...)) for resource-specific ones. */}}
{{- define "splitserve.checkovSkips" -}}
{{- $skips := list
  "CKV_K8S_43=Images are referenced by tag by default (image.digest pins a digest when set); the tag names a release of deploy/docker/Dockerfile"
  "CKV_K8S_15=imagePullPolicy is a value (IfNotPresent by default) so locally loaded development images work; production pins image.digest"
-}}
{{- if .ctx.Values.redis.passwordSecret.name }}
{{- $skips = append $skips "CKV_K8S_35=The Redis password must be part of the redis:// URL every process is given, so it comes from the Secret as an environment variable" }}
{{- end }}
{{- $skips = concat $skips (default list .extra) }}
{{- range $i, $s := $skips }}
checkov.io/skip{{ add1 $i }}: {{ $s | quote }}
{{- end }}
{{- end }}
