# envelope: from=MAILER-DAEMON@mx.example.net to=bob@example.com message=messages/bounce.eml
require "envelope";
if envelope :localpart :is "from" "mailer-daemon" { discard; stop; }
keep;
