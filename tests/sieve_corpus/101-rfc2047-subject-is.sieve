# envelope: from=alice@example.org to=francois@example.fr message=messages/encoded.eml
require ["fileinto"];
if header :is "subject" "Grüße aus München" {
  fileinto "yes";
} else {
  fileinto "no";
}
