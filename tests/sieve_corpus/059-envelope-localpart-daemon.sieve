# envelope: from=MAILER-DAEMON@mx.example.net to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "envelope"];
if envelope :localpart :is "from" "mailer-daemon" {
  fileinto "yes";
} else {
  fileinto "no";
}
