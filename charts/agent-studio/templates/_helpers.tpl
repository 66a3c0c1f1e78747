{{/* Names, labels and the pieces every pod shares; templates name nothing themselves. */}}

{{- define "agent-studio.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-agent-studio, or the release name when it already says agent-studio. */}}
{{- define "agent-studio.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := include "agent-studio.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* What selects a component's pods: (dict "root" $ "component" "ingest"). */}}
{{- define "agent-studio.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent-studio.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The labels every object carries: (dict "root" $ "component" "ingest"). */}}
{{- define "agent-studio.labels" -}}
{{ include "agent-studio.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: agent-studio
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* What selects every pod of this release (NATS clients are all of them). */}}
{{- define "agent-studio.releaseSelector" -}}
app.kubernetes.io/name: {{ include "agent-studio.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agent-studio.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "agent-studio.natsUrl" -}}
{{- if .Values.nats.enabled -}}
nats://{{ include "agent-studio.fullname" . }}-nats:4222
{{- else -}}
{{ .Values.nats.url }}
{{- end }}
{{- end }}

{{/* The ingest URL inside the cluster. */}}
{{- define "agent-studio.ingestUrl" -}}
http://{{ include "agent-studio.fullname" . }}-ingest.{{ .Release.Namespace }}.svc:{{ .Values.ingest.servicePort }}
{{- end }}

{{/* The Pod Security Standard "restricted" profile, for a pod running as `uid`. */}}
{{- define "agent-studio.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "agent-studio.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{- define "agent-studio.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* AGENTSTUDIO_PUBLIC_BASE_URL: the value, else derived from the Ingress. */}}
{{- define "agent-studio.publicBaseUrl" -}}
{{- if .Values.telephony.publicBaseUrl -}}
{{ .Values.telephony.publicBaseUrl }}
{{- else if .Values.ingress.enabled -}}
{{ ternary "https" "http" .Values.ingress.tls.enabled }}://{{ .Values.ingress.host }}
{{- end }}
{{- end }}

{{/* The settings every role reads (agentstudio/settings.py); secrets only by reference. */}}
{{- define "agent-studio.env" -}}
{{- if and (not .Values.nats.enabled) .Values.nats.urlSecret.name }}
- name: AGENTSTUDIO_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.nats.urlSecret.name }}
      key: {{ .Values.nats.urlSecret.key }}
{{- else }}
- name: AGENTSTUDIO_NATS_URL
  value: {{ include "agent-studio.natsUrl" . | quote }}
{{- end }}
{{- if .Values.nats.enabled }}
{{- include "agent-studio.natsAuthEnv" (dict "root" . "prefix" "AGENTSTUDIO_") }}
{{- end }}
- name: AGENTSTUDIO_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: AGENTSTUDIO_TELEPHONY_PROVIDER
  value: {{ .Values.telephony.provider | quote }}
{{- with include "agent-studio.publicBaseUrl" . }}
- name: AGENTSTUDIO_PUBLIC_BASE_URL
  value: {{ . | quote }}
{{- end }}
- name: AGENTSTUDIO_TWILIO_MAX_CALL_SECONDS
  value: {{ .Values.telephony.twilio.maxCallSeconds | quote }}
- name: AGENTSTUDIO_RING_TIMEOUT_SECONDS
  value: {{ .Values.calls.ringTimeoutSeconds | quote }}
- name: AGENTSTUDIO_MAX_CALL_SECONDS
  value: {{ .Values.calls.maxCallSeconds | quote }}
- name: AGENTSTUDIO_METRICS_REFRESH_SECONDS
  value: {{ .Values.metrics.refreshSeconds | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The Twilio credentials a role uses, by reference to the Secret: (dict "root" $ "vars" (list
"AUTH_TOKEN")). Only dialers place calls (all three); ingest only checks signatures (the token). */}}
{{- define "agent-studio.twilioEnv" -}}
{{- $twilio := .root.Values.telephony.twilio }}
{{- if $twilio.existingSecret }}
{{- $keys := dict "ACCOUNT_SID" $twilio.accountSidKey "AUTH_TOKEN" $twilio.authTokenKey "FROM_NUMBER" $twilio.fromNumberKey }}
{{- range $var := .vars }}
- name: AGENTSTUDIO_TWILIO_{{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $twilio.existingSecret }}
      key: {{ get $keys $var }}
{{- end }}
{{- end }}
{{- end }}

{{/* OpenTelemetry's standard variables for a role that traces calls, when tracing.enabled: (dict
"root" $ "role" "ingest"). The operator has no spans (its work is on no call's path), so gets none. */}}
{{- define "agent-studio.tracingEnv" -}}
{{- $tracing := .root.Values.tracing }}
{{- if $tracing.enabled }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: http/protobuf
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $tracing.otlpEndpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: agent-studio-{{ .role }}
- name: OTEL_RESOURCE_ATTRIBUTES
  {{- $attributes := list (printf "k8s.namespace.name=%s" .root.Release.Namespace) (printf "service.namespace=%s" .root.Release.Namespace) }}
  {{- range $key, $value := $tracing.resourceAttributes }}
  {{- $attributes = append $attributes (printf "%s=%s" $key $value) }}
  {{- end }}
  value: {{ join "," $attributes | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $tracing.sampler | quote }}
{{- with $tracing.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- if eq .role "dialer" }}{{/* the role whose requests reach other systems */}}
- name: AGENTSTUDIO_TRACE_OUTBOUND
  value: {{ $tracing.outbound | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* What values.schema.json cannot say (arithmetic across values); fails the render naming them. */}}
{{- define "agent-studio.checks" -}}
{{- if and (eq .Values.telephony.provider "twilio") (gt (add .Values.calls.maxCallSeconds 60) (int .Values.telephony.twilio.maxCallSeconds)) }}
{{- fail "calls.maxCallSeconds plus the 60 s TimeLimit backstop must fit in telephony.twilio.maxCallSeconds, the Twilio account's maximum call duration" }}
{{- end }}
{{- with .Values.dialer.autoscaling }}
{{- if .enabled }}
{{- /* Scale-in stops a dialer whatever it holds: the grace period must outlast a call placed just before
its SIGTERM (the preStop sleep, ringing, then the longest call). */}}
{{- $longest := add $.Values.dialer.preStopSleepSeconds $.Values.calls.ringTimeoutSeconds $.Values.calls.maxCallSeconds }}
{{- if lt (int $.Values.dialer.terminationGracePeriodSeconds) (int $longest) }}
{{- fail (printf "dialer.autoscaling: dialer.terminationGracePeriodSeconds (%d) must cover dialer.preStopSleepSeconds + calls.ringTimeoutSeconds + calls.maxCallSeconds (%d), or scale-in cuts live calls" (int $.Values.dialer.terminationGracePeriodSeconds) (int $longest)) }}
{{- end }}
{{- if gt (int .minReplicas) (int .maxReplicas) }}
{{- fail "dialer.autoscaling.minReplicas must not exceed dialer.autoscaling.maxReplicas" }}
{{- end }}
{{- if and (not $.Values.nats.enabled) (not .natsMonitoringEndpoint) }}
{{- fail "dialer.autoscaling.natsMonitoringEndpoint: the external NATS's monitor host:port is required (nats.enabled=false)" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when the dialers' ScaledObject is rendered: switched on and KEDA's CRD served. The
Deployment then sets no replicas, or every helm upgrade would reset what the HPA chose. */}}
{{- define "agent-studio.dialerScaledObject" -}}
{{- if and .Values.dialer.autoscaling.enabled (.Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject") }}true{{ end }}
{{- end }}

{{/* The bundled NATS's user and password, by reference to the release's Secret: (dict "root" $
"prefix" "AGENTSTUDIO_") for the roles, "" for nats-server (its config reads $NATS_USER). */}}
{{- define "agent-studio.natsAuthEnv" -}}
{{- range $var, $key := dict "NATS_USER" "user" "NATS_PASSWORD" "password" }}
- name: {{ $.prefix }}{{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ include "agent-studio.fullname" $.root }}-nats-auth
      key: {{ $key }}
{{- end }}
{{- end }}

{{/* nats.conf of the bundled NATS; its checksum rolls the servers when it changes. */}}
{{- define "agent-studio.natsConfig" -}}
server_name: $SERVER_NAME
listen: 0.0.0.0:4222
http: 0.0.0.0:8222
# Only this release's pods hold the password (a Secret of the release): a pod of another tenant
# reaching this server, where no CNI enforces the NetworkPolicy, cannot read or write anything.
authorization {
  user: $NATS_USER
  password: $NATS_PASSWORD
}
jetstream {
  store_dir: /data
  max_file_store: {{ .Values.nats.persistence.size }}
  max_memory_store: {{ .Values.nats.maxMemoryStore }}
}
{{- if gt (int .Values.nats.replicas) 1 }}
cluster {
  name: {{ .Release.Name }}
  listen: 0.0.0.0:6222
  no_advertise: true
  routes: [
    {{- range $i := until (int .Values.nats.replicas) }}
    nats://{{ include "agent-studio.fullname" $ }}-nats-{{ $i }}.{{ include "agent-studio.fullname" $ }}-nats-headless.{{ $.Release.Namespace }}.svc:6222
    {{- end }}
  ]
}
{{- end }}
{{- end }}
