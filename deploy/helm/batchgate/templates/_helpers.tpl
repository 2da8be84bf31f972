{{/* Names, labels, and the values every template derives from the config. */}}

{{- define "batchgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; also the `job` label its monitors set. */}}
{{- define "batchgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "batchgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "batchgate.labels" -}}
helm.sh/chart: {{ include "batchgate.chart" . }}
{{ include "batchgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end }}

{{- define "batchgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "batchgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "batchgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "batchgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* batchgate's public port (config.server.port). */}}
{{- define "batchgate.port" -}}
{{- dig "server" "port" 8080 .Values.config | int }}
{{- end }}

{{/*
The port /metrics is served on: the admin listener's when config.admin is set. A monitor on a
loopback admin listener (batchgate's default host for `admin:`) would scrape nothing: refused.
*/}}
{{- define "batchgate.metricsPortName" -}}
{{- if .Values.config.admin }}
{{- $host := .Values.config.admin.host | default "127.0.0.1" | toString }}
{{- if or (hasPrefix "127." $host) (eq $host "::1") (eq $host "localhost") }}
{{- fail (printf "config.admin.host: %s is loopback, which Prometheus cannot scrape; set 0.0.0.0 (or turn the monitors off)" $host) }}
{{- end }}
{{- "admin" }}
{{- else }}
{{- "http" }}
{{- end }}
{{- end }}

{{- define "batchgate.drainTimeout" -}}
{{- dig "server" "drain_timeout_s" 30 .Values.config | int }}
{{- end }}

{{/* Above drain_timeout_s, always: the pod must outlive batchgate's drain. */}}
{{- define "batchgate.terminationGracePeriod" -}}
{{- $drain := include "batchgate.drainTimeout" . | int }}
{{- $grace := .Values.terminationGracePeriodSeconds | default (add $drain 30) | int }}
{{- if le $grace $drain }}
{{- fail (printf "terminationGracePeriodSeconds: must be above config.server.drain_timeout_s (%d), got %d" $drain $grace) }}
{{- end }}
{{- $grace }}
{{- end }}

{{/*
batchgate's config.yaml: .Values.config, plus the engine as the only replica (sidecar mode,
unless config.replicas is given) or the discovery entries (gateway mode).
*/}}
{{- define "batchgate.configYaml" -}}
{{- $config := deepCopy .Values.config }}
{{- if eq .Values.mode "sidecar" }}
{{- if not (hasKey $config "replicas") }}
{{- $engine := dict "name" .Values.engine.name "url" (printf "http://127.0.0.1:%d" (int .Values.engine.port)) "max_concurrency" (int .Values.engine.maxConcurrency) }}
{{- $_ := set $config "replicas" (list $engine) }}
{{- end }}
{{- else }}
{{- if .Values.discovery }}
{{- $_ := set $config "discovery" .Values.discovery }}
{{- end }}
{{- if not (or $config.replicas $config.discovery (dig "health" "ready_without_replicas" false $config)) }}
{{- fail "gateway mode: set discovery (or config.replicas), or config.health.ready_without_replicas: true" }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The KEDA query: demand of this release's pods, `or vector(0)` on the in-flight part only. */}}
{{- define "batchgate.kedaQuery" -}}
{{- if .Values.autoscaling.keda.query }}
{{- .Values.autoscaling.keda.query }}
{{- else }}
{{- $sel := printf "namespace=%q, job=%q" .Release.Namespace (include "batchgate.fullname" .) }}
{{- printf "sum(batchgate_queue_depth{%s}) + (sum(batchgate_replica_in_flight{%s}) or vector(0))" $sel $sel }}
{{- end }}
{{- end }}
