{{/*
The chart's name, or nameOverride.
*/}}
{{- define "wirestub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else the release
name, with the chart's name appended unless the release name holds it.
Kubernetes names are at most 63 characters.
*/}}
{{- define "wirestub.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "wirestub.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "wirestub.labels" -}}
helm.sh/chart: {{ include "wirestub.chart" . }}
{{ include "wirestub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: mock-server
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the release's pods.
*/}}
{{- define "wirestub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wirestub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the pods run as.
*/}}
{{- define "wirestub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wirestub.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image, with the chart's appVersion as the default tag.
*/}}
{{- define "wirestub.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Whether the chart makes the mocks ConfigMap (protos or rules given inline).
*/}}
{{- define "wirestub.inlineMocks" -}}
{{- if or .Values.mocks.protos .Values.mocks.rules }}true{{ end }}
{{- end }}

{{/*
The key of an inline mock file in the ConfigMap: keys may not hold `/`,
so `shop/v1/catalog.proto` of the protos is `protos.shop__v1__catalog.proto`
(the volume's items put it back at its path).
*/}}
{{- define "wirestub.mockKey" -}}
{{- printf "%s.%s" .kind (.path | replace "/" "__") }}
{{- end }}

{{/*
The Secret of the admin token (the user's, or the chart's), empty when
there is no token.
*/}}
{{- define "wirestub.adminSecret" -}}
{{- if .Values.admin.existingSecret }}
{{- .Values.admin.existingSecret }}
{{- else if .Values.admin.token }}
{{- printf "%s-admin" (include "wirestub.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The Secret of the shared state's Redis URL, empty when there is none.
*/}}
{{- define "wirestub.sharedStateSecret" -}}
{{- if .Values.sharedState.existingSecret }}
{{- .Values.sharedState.existingSecret }}
{{- else if .Values.sharedState.redisUrl }}
{{- printf "%s-shared-state" (include "wirestub.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The arguments of `engine run`, one per line of a YAML list.
*/}}
{{- define "wirestub.args" -}}
{{- $runtime := "/var/lib/wirestub" -}}
- run
{{- if .Values.mocks.plan }}
- --plan
- {{ .Values.mocks.plan | quote }}
{{- with .Values.mocks.planIdentity }}
- --plan-identity
- {{ . | quote }}
{{- end }}
{{- if .Values.runtimeChanges.enabled }}
- --state-dir
- {{ $runtime | quote }}
{{- end }}
{{- else }}
{{- $protos := list }}
{{- $rules := list }}
{{- if .Values.runtimeChanges.enabled }}
{{- $protos = append $protos (printf "%s/protos" $runtime) }}
{{- $rules = append $rules (printf "%s/rules" $runtime) }}
{{- end }}
{{- $given := false }}
{{- /* A ConfigMap volume has a directory only for the kinds given. */}}
{{- if .Values.mocks.protos }}
{{- $given = true }}
{{- $protos = append $protos "/etc/wirestub/mocks/protos" }}
{{- end }}
{{- if .Values.mocks.rules }}
{{- $given = true }}
{{- $rules = append $rules "/etc/wirestub/mocks/rules" }}
{{- end }}
{{- if .Values.mocks.existingVolume }}
{{- $given = true }}
{{- range .Values.mocks.protosDirs }}
{{- $protos = append $protos (printf "%s/%s" (trimSuffix "/" $.Values.mocks.mountPath) .) }}
{{- end }}
{{- range .Values.mocks.rulesDirs }}
{{- $rules = append $rules (printf "%s/%s" (trimSuffix "/" $.Values.mocks.mountPath) .) }}
{{- end }}
{{- end }}
{{- if not $given }}
{{- /* The example bundled in the image. */}}
{{- $protos = append $protos "/app/protos" }}
{{- $rules = append $rules "/app/rules" }}
{{- end }}
{{- range $protos }}
- --protos
- {{ . | quote }}
{{- end }}
{{- range $rules }}
- --rules
- {{ . | quote }}
{{- end }}
{{- end }}
- --listen
- {{ printf "0.0.0.0:%d" (int .Values.engine.grpcPort) | quote }}
- --admin-listen
- {{ printf "0.0.0.0:%d" (int .Values.engine.adminPort) | quote }}
{{- if not (include "wirestub.adminSecret" .) }}
{{- if .Values.admin.insecure }}
- --admin-insecure
{{- else }}
{{- fail "the admin API listens on the pod's address for the probes: set admin.existingSecret or admin.token, or admin.insecure=true" }}
{{- end }}
{{- end }}
- --workers
- {{ .Values.engine.workers | int64 | quote }}
- --journal
- {{ .Values.journal.entries | int64 | quote }}
{{- if .Values.journal.bytes }}
- --journal-bytes
- {{ .Values.journal.bytes | int64 | quote }}
{{- end }}
- --log-format
- {{ .Values.engine.logFormat | quote }}
- --no-match
- {{ .Values.engine.noMatch | quote }}
- --shutdown-grace-ms
- {{ .Values.engine.shutdownGraceMs | int64 | quote }}
- --drain-timeout-ms
- {{ .Values.engine.drainTimeoutMs | int64 | quote }}
{{- if .Values.engine.upstream }}
- --upstream
- {{ .Values.engine.upstream | quote }}
{{- end }}
{{- if include "wirestub.sharedStateSecret" . }}
- --shared-state
- "$(WIRESTUB_SHARED_STATE)"
{{- if .Values.sharedState.prefix }}
- --shared-state-prefix
- {{ .Values.sharedState.prefix | quote }}
{{- end }}
{{- end }}
{{- range .Values.engine.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
