{{- define "kubetask.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetask.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetask.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kubetask.natsName" -}}
{{ include "kubetask.fullname" . }}-nats
{{- end -}}

{{- define "kubetask.natsReplicas" -}}
{{ if .Values.nats.cluster.enabled }}{{ .Values.nats.cluster.replicas }}{{ else }}1{{ end }}
{{- end -}}

{{- define "kubetask.natsUrl" -}}
nats://{{ include "kubetask.natsName" . }}.{{ .Release.Namespace }}.svc:4222
{{- end -}}

{{- define "kubetask.configMap" -}}
{{ include "kubetask.fullname" . }}-config
{{- end -}}

{{- define "kubetask.tokensSecret" -}}
{{ .Values.auth.existingSecret | default (printf "%s-tokens" (include "kubetask.fullname" .)) }}
{{- end -}}

{{- define "kubetask.natsUsersSecret" -}}
{{ include "kubetask.fullname" . }}-nats-users
{{- end }}

{{- define "kubetask.executor" -}}
{{- $e := .Values.dispatcher.executor | default "kubernetes" -}}
{{- if not (has $e (list "kubernetes" "local")) -}}
{{- fail (printf "dispatcher.executor must be kubernetes or local, not %q" $e) -}}
{{- end -}}
{{ $e }}
{{- end }}
